"""The user's tools on top of the shells: ``ftproxy demo``, ``ftproxy lab`` (network
namespaces) and a local etcd cluster for the demo and the tests."""
