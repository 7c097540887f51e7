//! One module per subcommand. Each takes the validated settings and returns `anyhow::Result`;
//! `main` maps errors to exit codes.

pub mod dev;
pub mod doctor;
pub mod explain;
pub mod invalidate;
pub mod migrate;
pub mod run;
pub mod stats;
