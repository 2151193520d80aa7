//! Client workloads shared by the demo and the benchmark command.
