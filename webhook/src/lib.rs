//! dbwebhook: injects dbproxy and dsnexec into labelled pods.
