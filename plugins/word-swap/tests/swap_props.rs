//! A word-swap negative differs from its caption in exactly one word, which
//! belongs to a group and is replaced by another word of the same group.

use proptest::prelude::*;
use vlmatch_word_swap::{default_groups, WordSwap};

fn words() -> Vec<&'static str> {
    vec![
        "a", "the", "red", "blue", "circle", "square", "small", "large", "left", "of", "on", "dog",
        "man,", "sky",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn swaps_exactly_one_grouped_word(picks in prop::collection::vec(0usize..14, 1..12), seed in any::<u64>()) {
        let vocab = words();
        let caption: Vec<&str> = picks.iter().map(|&i| vocab[i]).collect();
        let caption = caption.join(" ");
        let groups = default_groups();
        let ws = WordSwap::new(groups.clone(), None).unwrap();
        let mut state = seed;
        let swap = ws.swap(&caption, |n| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as usize % n
        });
        let in_group = |w: &str| groups.iter().position(|g| g.iter().any(|x| x == w.trim_end_matches(',')));
        match swap {
            None => prop_assert!(caption.split(' ').all(|w| in_group(w).is_none())),
            Some(s) => {
                prop_assert_ne!(&s.text, &caption);
                let a: Vec<&str> = caption.split(' ').collect();
                let b: Vec<&str> = s.text.split(' ').collect();
                prop_assert_eq!(a.len(), b.len());
                let diffs: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
                prop_assert_eq!(diffs, vec![s.index]);
                prop_assert_eq!(in_group(a[s.index]), in_group(b[s.index]));
                prop_assert!(in_group(a[s.index]).is_some());
                prop_assert_ne!(&s.original, &s.replacement);
            }
        }
    }
}
