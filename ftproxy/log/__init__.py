"""The log as files: the log file format, a replica's on-disk store, ``ftproxy log show``
and the pcap export. Below the trio shells, above the cores."""
