//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! same functions the `cargo fuzz` targets call, so every case the fuzzer
//! found is checked on stable Rust by `cargo test`.

use std::path::{Path, PathBuf};

use evilcluster_wire::fuzzing;

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

/// Every file of a target's corpus; fails when there is none, so a missing
/// or emptied corpus cannot pass silently.
fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = corpus_root().join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
}

fn replay(target: &str) {
    let files = corpus(target);
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let outcome = std::panic::catch_unwind(|| fuzzing::run(target, &data));
        assert!(outcome.is_ok(), "{target}: {} panicked", path.display());
    }
    eprintln!("{target}: replayed {} inputs", files.len());
}

#[test]
fn frame_corpus() {
    replay("frame");
}

#[test]
fn handshake_accept_corpus() {
    replay("handshake_accept");
}

#[test]
fn handshake_connect_corpus() {
    replay("handshake_connect");
}

#[test]
fn control_corpus() {
    replay("control");
}

#[test]
fn every_target_has_a_replay_test() {
    assert_eq!(
        fuzzing::TARGETS,
        ["frame", "handshake_accept", "handshake_connect", "control"]
    );
}

/// The seeds are valid inputs: the real transcripts complete the handshake.
#[test]
fn seeds_reach_the_end_of_the_handshake() {
    let (from_caller, from_listener) = fuzzing::real_transcript();
    let (accepted, sent) = fuzzing::handshake_accept(&from_caller);
    assert_eq!(accepted.expect("the seed is welcomed").path, fuzzing::caller().path);
    assert_eq!(
        sent, from_listener,
        "the listener answers the seed as in the real exchange"
    );
    let (connected, sent) = fuzzing::handshake_connect(&from_listener);
    assert_eq!(connected.expect("the seed welcomes").path, fuzzing::listener().path);
    assert_eq!(sent, from_caller);
    for target in fuzzing::TARGETS {
        for (_, data) in fuzzing::seeds(target) {
            fuzzing::run(target, &data);
        }
    }
}

/// Writes the seed inputs into `fuzz/corpus/<target>/seed-*`. Run by hand:
/// `cargo test -p evilcluster-wire --test fuzz_corpus -- --ignored write_seeds`.
#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seeds() {
    for target in fuzzing::TARGETS {
        let dir = corpus_root().join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, data) in fuzzing::seeds(target) {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }
}
