//! Layering rules beyond errors: switching a section's plugin in a higher
//! layer drops the keys lower layers set for the previous plugin.

mod common;
use common::*;

#[test]
fn switching_a_plugin_drops_the_previous_plugins_keys() {
    let dir = scratch("switch-plugin");
    let file = dir.join("swap.toml");
    std::fs::write(
        &file,
        "[model.image]\nplugin = \"other_encoder\"\nwidth = 3\n",
    )
    .unwrap();
    let mut layers = micro_layers(&[]);
    layers.files.push(file);
    let loaded = layers.load().unwrap();
    let params: Vec<&String> = loaded.config.model.image.params.keys().collect();
    assert_eq!(params, ["width"]);
    assert!(
        loaded.stale.contains("model.image.hidden_size"),
        "{:?}",
        loaded.stale
    );
    assert!(
        loaded.stale.contains("model.image.patch_size"),
        "{:?}",
        loaded.stale
    );
    // The saved run config does not carry the stale keys either.
    assert!(!loaded.to_toml().contains("patch_size"));
}

#[test]
fn restating_the_same_plugin_keeps_every_key() {
    let loaded = micro_layers(&[
        "model.image.plugin=\"vit\"",
        "samplers.hard_negative.plugin=\"hard_negative\"",
    ])
    .load()
    .unwrap();
    assert!(loaded.stale.is_empty(), "{:?}", loaded.stale);
    assert!(loaded.config.model.image.params.contains_key("patch_size"));
}
