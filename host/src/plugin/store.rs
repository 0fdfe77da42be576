//! What each wasmtime `Store` holds: a WASI context that grants nothing, the memory
//! limits, and the plugin's state.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{Deterministic, WasiCtx, WasiCtxView, WasiView};

use super::Limits;
use super::state::PluginState;

/// Data of one plugin instance's store.
pub struct StoreState {
    pub(super) plugin: Arc<str>,
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limits: StoreLimits,
    pub(super) state: PluginState,
    /// The last error the plugin logged during the current call (a panic's message, with
    /// the SDK), for the trap's dead letter.
    pub(super) last_error: Option<String>,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The bytes a plugin's "random" numbers cycle through: the same on every run.
const SEED: [u8; 16] = [
    0x9e, 0x37, 0x79, 0xb9, 0x7f, 0x4a, 0x7c, 0x15, 0xf3, 0x9c, 0xc0, 0x60, 0x5c, 0xed, 0xc8, 0x34,
];

/// A clock stopped at the Unix epoch: plugins must not depend on time (replay determinism).
struct StoppedClock;

impl wasmtime_wasi::HostWallClock for StoppedClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
    fn now(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for StoppedClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

impl StoreState {
    /// A store for `plugin` with `memory_bytes` of linear memory at most.
    pub fn new(
        plugin: Arc<str>,
        memory_bytes: usize,
        state: PluginState,
        grants: &Limits,
    ) -> StoreState {
        // No environment, arguments, preopened folders, sockets or stdio; unless granted,
        // clocks stopped and randomness seeded, so that a plugin computes the same thing on
        // every replay.
        let mut builder = WasiCtx::builder();
        builder
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false);
        if !grants.allow_clock {
            builder
                .wall_clock(StoppedClock)
                .monotonic_clock(StoppedClock);
        }
        if !grants.allow_random {
            builder
                .secure_random(Deterministic::new(SEED.to_vec()))
                .insecure_random(Deterministic::new(SEED.to_vec()))
                .insecure_random_seed(0);
        }
        let wasi = builder.build();
        StoreState {
            plugin,
            wasi,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_bytes)
                .trap_on_grow_failure(true)
                .instances(16)
                .tables(64)
                .memories(4)
                .build(),
            state,
            last_error: None,
        }
    }
}
