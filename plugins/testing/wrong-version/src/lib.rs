//! Built against `weir:plugin@9.0.0`: weir must refuse to load it, saying why.
#![cfg(target_arch = "wasm32")]

wit_bindgen::generate!({ path: "wit", world: "plugin" });

struct Wrong;

impl Guest for Wrong {
    fn init(_config: String) -> Result<(), String> {
        Ok(())
    }
    fn process(documents: Vec<String>) -> Vec<Result<Vec<weir::plugin::types::Output>, String>> {
        documents.iter().map(|_| Ok(Vec::new())).collect()
    }
}

export!(Wrong);
