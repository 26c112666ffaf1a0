//! Tests of launch detection (`super`): torchrun, Slurm, host lists.

use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

const TORCHRUN: &[(&str, &str)] = &[
    ("RANK", "3"),
    ("WORLD_SIZE", "8"),
    ("LOCAL_RANK", "1"),
    ("MASTER_ADDR", "10.0.0.1"),
    ("MASTER_PORT", "29500"),
];

#[test]
fn nothing_set_is_no_launch() {
    assert_eq!(LaunchEnv::from_lookup(env(&[])), Ok(None));
    // A batch script or salloc shell: no job step.
    let batch = env(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_JOB_ID", "1"),
    ]);
    assert_eq!(LaunchEnv::from_lookup(batch), Ok(None));
}

#[test]
fn torchrun_is_read() {
    let got = LaunchEnv::from_lookup(env(TORCHRUN)).unwrap().unwrap();
    assert_eq!(
        got,
        LaunchEnv {
            rank: 3,
            world_size: 8,
            local_rank: 1,
            master_addr: "10.0.0.1".into(),
            master_port: 29500,
            launcher: Launcher::Torchrun,
            agent_store: false,
            restart_count: None,
        }
    );
    assert!(!got.is_master());
}

#[test]
fn torchrun_agent_store_and_restart_count_are_read() {
    let mut pairs = TORCHRUN.to_vec();
    pairs.extend([
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
    ]);
    let got = LaunchEnv::from_lookup(env(&pairs)).unwrap().unwrap();
    assert!(got.agent_store);
    assert_eq!(got.restart_count, Some(2));
    let mut pairs = TORCHRUN.to_vec();
    pairs.push(("TORCHELASTIC_USE_AGENT_STORE", "False"));
    assert!(
        !LaunchEnv::from_lookup(env(&pairs))
            .unwrap()
            .unwrap()
            .agent_store
    );
    let mut pairs = TORCHRUN.to_vec();
    pairs.push(("TORCHELASTIC_RESTART_COUNT", "x"));
    let err = LaunchEnv::from_lookup(env(&pairs)).unwrap_err();
    assert!(
        err.to_string().contains("TORCHELASTIC_RESTART_COUNT"),
        "{err}"
    );
}

#[test]
fn torchrun_wins_inside_slurm() {
    let mut pairs = TORCHRUN.to_vec();
    pairs.extend([
        ("SLURM_PROCID", "0"),
        ("SLURM_STEP_ID", "0"),
        ("SLURM_NTASKS", "1"),
    ]);
    let got = LaunchEnv::from_lookup(env(&pairs)).unwrap().unwrap();
    assert_eq!((got.launcher, got.rank), (Launcher::Torchrun, 3));
}

#[test]
fn torchrun_errors_name_the_variable() {
    let mut pairs = TORCHRUN.to_vec();
    pairs.retain(|(k, _)| *k != "MASTER_PORT");
    let err = LaunchEnv::from_lookup(env(&pairs)).unwrap_err();
    assert!(matches!(
        err,
        LaunchError::Missing {
            var: "MASTER_PORT",
            ..
        }
    ));
    assert!(err.to_string().contains("MASTER_PORT is not set"), "{err}");

    for (var, bad) in [
        ("RANK", "x"),
        ("RANK", "8"),
        ("WORLD_SIZE", "0"),
        ("LOCAL_RANK", "-1"),
        ("MASTER_PORT", "0"),
        ("MASTER_PORT", "70000"),
        ("MASTER_ADDR", ""),
    ] {
        let mut pairs = TORCHRUN.to_vec();
        for p in pairs.iter_mut() {
            if p.0 == var {
                p.1 = bad;
            }
        }
        let err = LaunchEnv::from_lookup(env(&pairs)).unwrap_err();
        let msg = err.to_string();
        // WORLD_SIZE=0 is reported on WORLD_SIZE; RANK=8 on RANK.
        assert!(msg.contains(var), "{var}={bad}: {msg}");
    }
}

const SLURM: &[(&str, &str)] = &[
    ("SLURM_PROCID", "5"),
    ("SLURM_STEP_ID", "0"),
    ("SLURM_NTASKS", "8"),
    ("SLURM_LOCALID", "1"),
    ("SLURM_JOB_NODELIST", "gpu[03-05,07]"),
    ("SLURM_JOB_ID", "123456"),
];

#[test]
fn slurm_is_read() {
    let got = LaunchEnv::from_lookup(env(SLURM)).unwrap().unwrap();
    assert_eq!(
        got,
        LaunchEnv {
            rank: 5,
            world_size: 8,
            local_rank: 1,
            master_addr: "gpu03".into(),
            master_port: 15000 + (123456 % 20000) as u16,
            launcher: Launcher::Slurm,
            agent_store: false,
            restart_count: None,
        }
    );
    // The old spelling of the step id counts too.
    let mut pairs = SLURM.to_vec();
    pairs.retain(|(k, _)| *k != "SLURM_STEP_ID");
    pairs.push(("SLURM_STEPID", "2"));
    assert!(LaunchEnv::from_lookup(env(&pairs)).unwrap().is_some());
}

#[test]
fn slurm_prefers_step_nodelist_and_master_vars() {
    let mut pairs = SLURM.to_vec();
    pairs.push(("SLURM_STEP_NODELIST", "gpu[05-07]"));
    let got = LaunchEnv::from_lookup(env(&pairs)).unwrap().unwrap();
    assert_eq!(got.master_addr, "gpu05");
    pairs.extend([("MASTER_ADDR", "head"), ("MASTER_PORT", "29400")]);
    let got = LaunchEnv::from_lookup(env(&pairs)).unwrap().unwrap();
    assert_eq!((got.master_addr.as_str(), got.master_port), ("head", 29400));
}

#[test]
fn slurm_errors_name_the_variable() {
    let mut pairs = SLURM.to_vec();
    pairs.retain(|(k, _)| *k != "SLURM_JOB_ID");
    let err = LaunchEnv::from_lookup(env(&pairs)).unwrap_err();
    assert!(err.to_string().contains("SLURM_JOB_ID"), "{err}");
    assert!(err.to_string().contains("MASTER_PORT"), "{err}");

    let mut pairs = SLURM.to_vec();
    pairs.retain(|(k, _)| *k != "SLURM_JOB_NODELIST");
    let err = LaunchEnv::from_lookup(env(&pairs)).unwrap_err();
    assert!(err.to_string().contains("SLURM_JOB_NODELIST"), "{err}");

    let mut pairs = SLURM.to_vec();
    for p in pairs.iter_mut() {
        if p.0 == "SLURM_JOB_NODELIST" {
            p.1 = "gpu[03-";
        }
    }
    let err = LaunchEnv::from_lookup(env(&pairs)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("SLURM_JOB_NODELIST") && msg.contains("never closed"),
        "{msg}"
    );

    let mut pairs = SLURM.to_vec();
    for p in pairs.iter_mut() {
        if p.0 == "SLURM_PROCID" {
            p.1 = "8";
        }
    }
    let msg = LaunchEnv::from_lookup(env(&pairs)).unwrap_err().to_string();
    assert!(
        msg.contains("SLURM_PROCID") && msg.contains("SLURM_NTASKS=8"),
        "{msg}"
    );
}

#[test]
fn slurm_port_range() {
    assert_eq!(slurm_port(0), 15000);
    assert_eq!(slurm_port(19999), 34999);
    assert_eq!(slurm_port(20000), 15000);
    assert_eq!(slurm_port(u64::MAX), 15000 + (u64::MAX % 20000) as u16);
}

#[test]
fn first_host_examples() {
    for (list, want) in [
        ("node01", "node01"),
        ("node[03-05,07]", "node03"),
        ("node[07,03-05]", "node07"),
        ("gpu1,gpu2", "gpu1"),
        ("a[1-2],b[3-4]", "a1"),
        ("rack[1-2]-n[01-04]", "rack1-n01"),
        ("gpu-[001-004]-ib", "gpu-001-ib"),
        ("  host.example.org ", "host.example.org"),
        ("n[8-10]", "n8"),
    ] {
        assert_eq!(first_host(list).as_deref(), Ok(want), "{list}");
    }
    for bad in [
        "",
        " ",
        ",a",
        "node[",
        "node]",
        "node[]",
        "node[a-b]",
        "node[1-]",
        "node[5-3]",
        "node[1,,2]",
        "no de",
        "node[1-2",
    ] {
        assert!(first_host(bad).is_err(), "{bad:?} should be rejected");
    }
}

/// A rendered host-list entry and its first host.
fn entry() -> impl Strategy<Value = (String, String)> {
    let prefix = "[a-z][a-z0-9_.-]{0,8}";
    let suffix = prop::option::of("-[a-z0-9]{1,4}");
    let range = (0u32..1000, 0u32..50, 0usize..4).prop_map(|(lo, len, width)| {
        let hi = lo + len;
        let lo_s = format!("{lo:0width$}");
        let text = if len == 0 {
            lo_s.clone()
        } else {
            format!("{lo_s}-{hi:0width$}")
        };
        (text, lo_s)
    });
    let group = prop::option::of(prop::collection::vec(range, 1..4));
    (prefix, group, suffix).prop_map(|(prefix, group, suffix)| {
        let suffix = suffix.unwrap_or_default();
        match group {
            None => (format!("{prefix}{suffix}"), format!("{prefix}{suffix}")),
            Some(ranges) => {
                let first = ranges[0].1.clone();
                let body: Vec<String> = ranges.into_iter().map(|r| r.0).collect();
                (
                    format!("{prefix}[{}]{suffix}", body.join(",")),
                    format!("{prefix}{first}{suffix}"),
                )
            }
        }
    })
}

proptest! {
    #[test]
    fn first_host_of_generated_lists(entries in prop::collection::vec(entry(), 1..5)) {
        let list: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        let list = list.join(",");
        prop_assert_eq!(first_host(&list), Ok(entries[0].1.clone()), "{}", list);
    }

    #[test]
    fn first_host_never_panics(s in "\\PC{0,40}") {
        let _ = first_host(&s);
    }

    #[test]
    fn first_host_rejects_unbalanced(prefix in "[a-z]{1,6}", digits in "[0-9]{1,3}") {
        let open = format!("{prefix}[{digits}");
        let close = format!("{prefix}{digits}]");
        prop_assert!(first_host(&open).is_err());
        prop_assert!(first_host(&close).is_err());
    }

    #[test]
    fn rank_beyond_world_is_rejected(world in 1usize..64, extra in 0usize..64) {
        let rank = (world + extra).to_string();
        let world = world.to_string();
        let pairs = [
            ("RANK", rank.as_str()),
            ("WORLD_SIZE", world.as_str()),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ];
        let err = LaunchEnv::from_lookup(env(&pairs)).unwrap_err();
        prop_assert!(err.to_string().contains("RANK"));
    }
}
