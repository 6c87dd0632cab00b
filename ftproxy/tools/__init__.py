"""The user's tools on top of the shells: ``ftproxy demo`` (a package, one module per
job), ``ftproxy lab`` (network namespaces), a local etcd cluster for the demo and the
tests, and the one RESP client (``resp``) that the demo, bench/ and tests/ share."""
