//! # favor-bench
//!
//! The benchmark and I/O tool of favor (the `favor-bench` binary): the paper's speed/memory
//! curves (`curves`), accuracy figures (`accuracy`), this machine's ceilings (`roofline`),
//! single-kernel profiling (`profile`), the cost of strided layouts (`layouts`), what grouped key/value heads save (`groups`), serving-style slot decoding (`serve`) and npy round
//! trips (`run`). The library holds the pieces
//! so that the integration tests and criterion benches use the same code.

pub mod alloc;
pub mod error;
pub mod limits;
pub mod meta;
pub mod plot;
pub mod records;

pub use error::{BenchError, Result};
pub mod accuracy;
pub mod backends;
pub mod baselines;
pub mod curves;
pub mod groups;
pub mod layouts;
pub mod measure;
pub mod npy;
pub mod profile;
pub mod roofline;
pub mod runcmd;
pub mod serve;
pub mod workload;
