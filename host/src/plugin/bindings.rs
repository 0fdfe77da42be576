//! The generated bindings of `wit/weir-plugin.wit`, kept in this module: nothing generated
//! is visible outside `plugin`.

use super::store::StoreState;

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
});

use self::weir::plugin::host::Level;

impl self::weir::plugin::host::Host for StoreState {
    fn log(&mut self, level: Level, message: String) {
        let plugin = &*self.plugin;
        // A plugin's message is its own text: cap it so that a chatty plugin cannot flood
        // the log.
        let message: String = message.chars().take(4096).collect();
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => {
                tracing::error!(plugin, "{message}");
                self.last_error = Some(message);
            }
        }
    }

    fn state_get(&mut self, key: String) -> Option<Vec<u8>> {
        self.state.get(&key)
    }

    fn state_set(&mut self, key: String, value: Vec<u8>) {
        self.state.set(key, value);
    }

    fn state_delete(&mut self, key: String) {
        self.state.delete(key);
    }
}

impl self::weir::plugin::types::Host for StoreState {}
