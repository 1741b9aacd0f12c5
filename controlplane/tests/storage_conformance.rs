//! openraft's storage conformance suite, run against the RocksDB log store and state machine.
#![allow(clippy::result_large_err)] // the suite's signatures return openraft's StorageError

use custos_controlplane::store::{self, LogStore, StateMachine};
use custos_controlplane::types::{NodeId, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tempfile::TempDir;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = TempDir::new().expect("temp dir");
        let (_, log, sm) = store::open(&dir.path().join("db")).expect("open rocksdb");
        Ok((dir, log, sm))
    }
}

#[test]
fn rocksdb_store_passes_openraft_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(RocksBuilder)
}
