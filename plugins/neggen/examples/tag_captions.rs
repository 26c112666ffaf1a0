//! Print each caption of a file (one per line) with NegGen's noun/adjective
//! candidates marked, as `tests/fixtures/tagging.txt` records them:
//!     cargo run -p vlmatch-neggen --example tag_captions -- FILE
use vlmatch_neggen::{default_tags_vec, mark_candidates, BrillTagger};

fn main() {
    let path = std::env::args().nth(1).expect("usage: tag_captions FILE");
    let tagger = BrillTagger::new();
    for line in std::fs::read_to_string(path).expect("readable").lines() {
        let caption = line.split('\t').next().unwrap_or("");
        if caption.is_empty() {
            continue;
        }
        println!(
            "{caption}\t{}",
            mark_candidates(caption, &tagger, &default_tags_vec())
        );
    }
}
