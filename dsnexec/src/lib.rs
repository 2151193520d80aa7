//! dsnexec: renders templated commands from mounted secrets and runs them on change.
