//! Credentials as a db-controller Secret delivers them: DSN parsing and watching mounted files.
