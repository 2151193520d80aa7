//! Locates the workspace's own binaries (dbproxy, dsnexec, dbwebhook) for end-to-end tests.
