//! Process entry points shared by the binaries: `coord`, `server` and `demo` (which runs the
//! coord and the servers as child processes of itself) start processes the same way.

pub mod cluster_status;
pub mod launch;
pub mod procs;
pub mod txn_text;
