"""The trio shells around the cores: the supervisor and the guest process, the world's
answers (record) and the log's (replay), primary, backup and re-protection, the log
link, the network fronts, the admin endpoint and its metrics. Protocols speak events;
these modules move the bytes."""
