//! SCRAM-SHA-256 both ways: proving our DSN password to PostgreSQL, and verifying clients on
//! non-loopback listeners.

pub mod scram_client;
pub mod scram_server;
