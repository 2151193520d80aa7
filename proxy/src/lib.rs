//! dbproxy: a PostgreSQL proxy that logs in with whatever the mounted Secret holds now.
