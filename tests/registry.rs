//! The registry: the exact set of linked plugins, duplicate and unknown names.

use std::rc::Rc;
use vlmatch_core::{Encoder, Result};
use vlmatch_registry::registration::Entry;
use vlmatch_registry::{BuildContext, Factory, Kind, Registry};

// The binary's library crate links every built-in plugin.
use vlmatch as _;

#[test]
fn every_builtin_plugin_is_registered() {
    let r = Registry::from_inventory().unwrap();
    assert_eq!(
        r.names(Kind::Encoder),
        [
            "bert",
            "clip_vit",
            "co_attention",
            "cross_attention",
            "roberta",
            "vit"
        ]
    );
    assert_eq!(r.names(Kind::Generator), ["mlm_head", "roberta_lm_head"]);
    assert_eq!(r.names(Kind::Discriminator), ["linear"]);
    assert_eq!(
        r.names(Kind::NegativeSampler),
        ["hard_negative", "neggen", "neggen_cache", "word_swap"]
    );
    assert_eq!(
        r.names(Kind::Objective),
        ["itc", "itm", "mlm", "rtd", "siglip"]
    );
    let listing = vlmatch::commands::plugins::plugin_listing(&[]).unwrap();
    assert!(
        listing.contains("vit") && listing.contains("vlmatch-vit"),
        "{listing}"
    );
}

fn fake(_: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    unreachable!("never built")
}

#[test]
fn a_name_registered_twice_is_an_error_naming_both_crates() {
    let mut r = Registry::from_inventory().unwrap();
    let err = r
        .insert(Entry {
            name: "vit".into(),
            origin: "my-plugins".into(),
            factory: Factory::Encoder(fake),
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("encoder plugin `vit` is registered twice"),
        "{err}"
    );
    assert!(
        err.contains("vlmatch-vit") && err.contains("my-plugins"),
        "{err}"
    );
    // Another kind may reuse the name.
    r.insert(Entry {
        name: "vit".into(),
        origin: "my-plugins".into(),
        factory: Factory::Objective(|_| unreachable!()),
    })
    .unwrap();
}

#[test]
fn an_unknown_name_lists_the_names_of_its_kind() {
    let r = Registry::from_inventory().unwrap();
    let err = r
        .get(Kind::Objective, "mlm2", "objectives.mlm2.plugin")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("unknown objective plugin `mlm2`"), "{err}");
    assert!(
        err.contains("registered objective plugins: itc, itm, mlm, rtd, siglip"),
        "{err}"
    );
}
