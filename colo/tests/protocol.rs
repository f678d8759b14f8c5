//! A real primary and a real secondary over loopback TCP, with mock VMs (no KVM): memory
//! equality after checkpoints, statuses and events, a lost or hung secondary, failover from
//! either side, failover before the first checkpoint, garbage on the secondary's port, and a
//! corrupted checkpoint.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use colo::{ColoState, ExitAction, ProtectionError, Role};
use common::*;

/// Lets the guests run, takes two checkpoints that do not pause, then one with pause-after,
/// and checks that both VMs are paused with the same RAM and the SVM holds the PVM's state.
fn memory_equality(channels: u16) {
    let mut pair = start_pair(Setup {
        channels,
        // Only requested checkpoints: the test resumes the VMs by hand after each pause-after
        // one, which must not race with an interval checkpoint.
        interval: Duration::from_secs(3600),
        ..Setup::default()
    });
    pair.wait_protected();
    let svm = pair.svm();
    let pvm = pair.pvm().clone();
    let mut last_seq = 0u64;
    for round in 0..3 {
        let (pm, sm) = (pvm.mutations(), svm.mutations());
        for _ in 0..2 {
            run_for(Duration::from_millis(40));
            pair.p.protection.checkpoint(false).unwrap();
        }
        run_for(Duration::from_millis(40));
        pair.p.protection.checkpoint(true).unwrap();
        let ev = pair
            .p
            .obs
            .wait_event(WAIT, |e| {
                e.name == "checkpoint"
                    && e.props["pause_after"] == true
                    && e.props["seq"].as_u64().unwrap() > last_seq
            })
            .unwrap_or_else(|| {
                panic!(
                    "round {round}: no pause-after checkpoint; exits {:?} {:?}",
                    pair.p.obs.exit(),
                    pair.s.obs.exit()
                )
            });
        let seq = ev.props["seq"].as_u64().unwrap();
        assert_eq!(ev.props["reason"], "request");
        last_seq = seq;
        assert!(
            wait_until(WAIT, || {
                let s = pair.s.protection.status();
                s.last_checkpoint.is_some_and(|c| c.seq >= seq)
                    && pvm.is_paused()
                    && svm.is_paused()
            }),
            "round {round}: checkpoint {seq} not applied with both VMs paused: {:?}, pvm paused {}, svm paused {}",
            pair.s.protection.status(),
            pvm.is_paused(),
            svm.is_paused()
        );
        let s = pair.s.protection.status();
        assert_eq!(s.last_checkpoint.as_ref().unwrap().seq, seq);
        assert!(pvm.mutations() > pm, "the PVM's guest ran");
        assert!(
            svm.mutations() > sm,
            "the SVM's guest ran and wrote its own pages"
        );
        if let Some(d) = ram_diff(&pvm.ram(), &svm.ram(), &test_regions()) {
            panic!("round {round}, {channels} channel(s): SVM RAM differs from PVM RAM: {d}");
        }
        let saved = pvm.saved();
        let loaded = svm.loaded();
        assert_eq!(
            loaded.last(),
            saved.last(),
            "the SVM holds the PVM's state of checkpoint {seq}"
        );
        assert_eq!(
            loaded, saved,
            "every state the PVM saved was loaded, in order"
        );
        assert!(pvm.violations().is_empty(), "{:?}", pvm.violations());
        assert!(svm.violations().is_empty(), "{:?}", svm.violations());
        // The user resumes both.
        pvm.resume_by_user();
        svm.resume_by_user();
    }
    assert_eq!(pair.s.protection.status().channels, u32::from(channels));
    assert!(pair.p.obs.exit().is_none() && pair.s.obs.exit().is_none());
    pair.stop_guests();
}

#[test]
fn memory_equal_after_pause_after_checkpoint_1_channel() {
    memory_equality(1);
}

#[test]
fn memory_equal_after_pause_after_checkpoint_4_channels() {
    memory_equality(4);
}

#[test]
fn statuses_and_events() {
    let pair = start_pair(Setup {
        channels: 2,
        ..Setup::default()
    });
    pair.wait_protected();
    pair.wait_checkpoints(4);
    // The secondary applies a checkpoint before the primary counts it.
    assert!(wait_until(WAIT, || pair.s.protection.status().checkpoints >= 4));
    let p = pair.p.protection.status();
    let s = pair.s.protection.status();
    // Both sides hear the other's beats (every 20 ms here).
    for (side, st) in [("primary", &p), ("secondary", &s)] {
        let ago = st.heartbeat.last_seen_ms_ago;
        assert!(
            ago.is_some_and(|ms| ms < HB_TIMEOUT.as_millis() as f64),
            "{side}: last beat {ago:?} ms ago"
        );
    }

    assert_eq!(p.role, Role::Primary);
    assert!(matches!(
        p.state,
        ColoState::Protected | ColoState::Checkpointing
    ));
    assert!(p.checkpoints >= 3, "{p:?}");
    assert_eq!(p.reasons.get("initial"), Some(&1), "{:?}", p.reasons);
    assert!(
        p.reasons.get("interval").is_some_and(|n| *n >= 1),
        "{:?}",
        p.reasons
    );
    assert!(p.pause_ms.mean > 0.0, "{:?}", p.pause_ms);
    assert!(p.pause_ms.max >= p.pause_ms.mean);
    assert!(p.protected_ms.is_some());
    assert_eq!(p.channels, 2);
    assert_eq!(p.checkpoint_interval_ms, 50);
    assert_eq!(p.heartbeat.interval_ms, 20);
    assert_eq!(p.heartbeat.timeout_ms, 300);
    let last = p.last_checkpoint.as_ref().expect("last checkpoint");
    for phase in ["pause", "collect", "transfer", "secondary", "resume"] {
        assert!(
            last.phases_ms.contains_key(phase),
            "primary phase {phase} missing: {:?}",
            last.phases_ms
        );
    }
    assert!(p.exit.is_none());

    assert_eq!(s.role, Role::Secondary);
    assert!(s.checkpoints >= 3, "{s:?}");
    assert_eq!(s.reasons.get("initial"), Some(&1), "{:?}", s.reasons);
    assert!(s.reasons.get("interval").is_some_and(|n| *n >= 1));
    let slast = s
        .last_checkpoint
        .as_ref()
        .expect("secondary last checkpoint");
    for phase in ["pause", "flush", "load", "resume"] {
        assert!(
            slast.phases_ms.contains_key(phase),
            "secondary phase {phase} missing: {:?}",
            slast.phases_ms
        );
    }
    assert!(s.pause_ms.mean > 0.0, "{:?}", s.pause_ms);
    assert_eq!(s.channels, 2);
    assert!(s.exit.is_none());
    // The status serializes as the API shows it.
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["role"], "primary");
    assert_eq!(json["reasons"]["initial"], 1);

    for (side, obs) in [("primary", &pair.p.obs), ("secondary", &pair.s.obs)] {
        assert_eq!(
            obs.events("protected").len(),
            1,
            "{side}: one protected event"
        );
        let cps = obs.events("checkpoint");
        assert!(cps.len() >= 3, "{side}: {} checkpoint events", cps.len());
        assert_eq!(cps[0].props["reason"], "initial", "{side}");
        let seqs: Vec<u64> = cps
            .iter()
            .map(|e| e.props["seq"].as_u64().expect("seq"))
            .collect();
        assert_eq!(seqs[0], 1, "{side}: {seqs:?}");
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "{side}: seq not increasing by one: {seqs:?}"
        );
        for e in &cps {
            assert!(
                e.props["pause_ms"].as_f64().is_some(),
                "{side}: {:?}",
                e.props
            );
            assert!(e.props["phases_ms"].is_object(), "{side}: {:?}", e.props);
        }
    }
    assert!(
        pair.pvm().violations().is_empty(),
        "{:?}",
        pair.pvm().violations()
    );
    assert!(
        pair.svm().violations().is_empty(),
        "{:?}",
        pair.svm().violations()
    );
}

/// What the survivors look like once the secondary was lost.
fn check_primary_survived(pair: &Pair, exit: &colo::ColoExit) {
    assert_eq!(exit.role, Role::Primary);
    assert_eq!(exit.action, ExitAction::Continue, "{exit:?}");
    let pvm = pair.pvm();
    assert!(!pvm.is_paused(), "the PVM was left paused");
    let (pauses, resumes) = pvm.pause_counts();
    assert_eq!(pauses, resumes, "every pause by COLO was resumed");
    assert!(pvm.violations().is_empty(), "{:?}", pvm.violations());
    assert!(!pair.p.protection.active());
    assert_eq!(pair.p.obs.exit_calls(), 1);
    assert_eq!(
        pair.p.protection.checkpoint(false),
        Err(ProtectionError::Ended)
    );
}

/// The SVM is still on the last checkpoint the secondary completed.
fn check_svm_on_last_complete_checkpoint(pair: &Pair, applied: u64) {
    let svm = pair.svm();
    let loaded = svm.loaded();
    let saved = pair.pvm().saved();
    assert_eq!(
        loaded.len() as u64,
        applied,
        "one load per applied checkpoint"
    );
    assert_eq!(
        &saved[..loaded.len()],
        &loaded[..],
        "the SVM loaded exactly the PVM's states, in order"
    );
    assert_eq!(
        svm.ram_writes_since_load(),
        0,
        "nothing of an incomplete checkpoint reached SVM memory"
    );
}

/// Three runs: which of the checkpoint stream and the heartbeat notices a death first varies.
fn secondary_cut(mid_checkpoint: bool) {
    for _ in 0..3 {
        secondary_cut_once(mid_checkpoint);
    }
}

fn secondary_cut_once(mid_checkpoint: bool) {
    let pair = start_pair(Setup {
        proxy: true,
        interval: Duration::from_millis(100),
        ..Setup::default()
    });
    pair.wait_protected();
    pair.wait_checkpoints(3);
    if mid_checkpoint {
        pair.proxy().on_next_state(OnState::Cut);
    } else {
        pair.proxy().cut();
    }
    let ((pexit, pat), (sexit, _)) = pair.wait_exits(WAIT);
    let (what, cut_at) = pair.proxy().fired().expect("the proxy cut");
    assert_eq!(what, "cut");
    let took = pat.duration_since(cut_at);
    assert!(took < Duration::from_secs(1), "the primary took {took:?}");
    check_primary_survived(&pair, &pexit);
    if mid_checkpoint {
        assert!(pexit.during_checkpoint, "{pexit:?}");
    }

    assert_eq!(sexit.role, Role::Secondary);
    assert_eq!(sexit.action, ExitAction::Continue, "{sexit:?}");
    assert!(sexit.after_checkpoints >= 3, "{sexit:?}");
    assert_eq!(pair.s.protection.status().state, ColoState::FailedOver);
    // Every checkpoint the primary counted was applied; the cut one (if any) was not.
    assert_eq!(sexit.after_checkpoints, pexit.after_checkpoints);
    check_svm_on_last_complete_checkpoint(&pair, sexit.after_checkpoints);
    assert!(!pair.svm().is_paused(), "the SVM runs on");

    // Each side names the lost peer, not the I/O error the loss caused, and shows that it
    // failed over.
    assert_eq!(
        pair.p.protection.status().state,
        ColoState::FailedOver,
        "{pexit:?}"
    );
    assert!(
        pexit.reason.contains("secondary lost"),
        "the primary's reason names the lost secondary: {pexit:?}"
    );
    assert!(
        sexit.reason.starts_with("primary lost"),
        "the secondary's reason names the lost primary: {sexit:?}"
    );
}

#[test]
fn secondary_dies_between_checkpoints() {
    secondary_cut(false);
}

#[test]
fn secondary_dies_during_a_checkpoint() {
    secondary_cut(true);
}

fn secondary_hang(mid_checkpoint: bool) {
    let pair = start_pair(Setup {
        proxy: true,
        interval: Duration::from_millis(100),
        ..Setup::default()
    });
    pair.wait_protected();
    pair.wait_checkpoints(3);
    if mid_checkpoint {
        // The PVM is paused, the primary waits for an Ack that never comes.
        pair.proxy().on_next_state(OnState::Freeze);
    } else {
        pair.proxy().freeze();
    }
    let (pexit, pat) = pair
        .p
        .obs
        .wait_exit(HB_TIMEOUT + Duration::from_secs(3))
        .expect("the primary ends protection");
    let (what, frozen_at) = pair.proxy().fired().expect("the proxy froze");
    assert_eq!(what, "freeze");
    let took = pat.duration_since(frozen_at);
    assert!(
        took < HB_TIMEOUT + Duration::from_secs(1),
        "the primary took {took:?}"
    );
    check_primary_survived(&pair, &pexit);
    assert_eq!(pair.p.protection.status().state, ColoState::FailedOver);
    assert!(
        pexit.reason.contains("secondary lost") && pexit.reason.contains("no heartbeat"),
        "a hang is a heartbeat timeout: {pexit:?}"
    );
    if mid_checkpoint {
        assert!(pexit.during_checkpoint, "{pexit:?}");
    }
    // The secondary hears nothing either (a partition): it times out too, on its own.
    let (sexit, _) = pair
        .s
        .obs
        .wait_exit(WAIT)
        .expect("the secondary ends protection");
    assert_eq!(sexit.action, ExitAction::Continue, "{sexit:?}");
    assert!(sexit.reason.starts_with("primary lost"), "{sexit:?}");
}

#[test]
fn secondary_hangs_between_checkpoints() {
    secondary_hang(false);
}

#[test]
fn secondary_hangs_during_a_checkpoint() {
    secondary_hang(true);
}

#[test]
fn failover_on_primary_stops_the_secondary() {
    // Ten runs: the farewell and the end of the checkpoint stream race to the secondary.
    for i in 0..10 {
        let pair = start_pair(Setup::default());
        pair.wait_protected();
        pair.wait_checkpoints(2);
        pair.p.protection.failover().unwrap();
        let ((pexit, _), (sexit, _)) = pair.wait_exits(WAIT);
        assert_eq!(pexit.action, ExitAction::Continue, "run {i}: {pexit:?}");
        assert!(
            pexit.reason.contains("failover requested"),
            "run {i}: {pexit:?}"
        );
        assert!(!pair.pvm().is_paused(), "run {i}: the PVM runs on");
        assert_eq!(pair.p.protection.status().state, ColoState::FailedOver);
        assert_eq!(
            pair.p.protection.failover(),
            Err(ProtectionError::Ended),
            "run {i}"
        );
        assert_eq!(
            sexit.action,
            ExitAction::Stop,
            "run {i}: the primary said farewell, so the SVM must stop: {sexit:?}"
        );
        assert_eq!(
            pair.s.protection.status().state,
            ColoState::Stopped,
            "run {i}"
        );
    }
}

#[test]
fn failover_on_secondary_primary_continues() {
    for i in 0..3 {
        let pair = start_pair(Setup::default());
        pair.wait_protected();
        pair.wait_checkpoints(2);
        pair.s.protection.failover().unwrap();
        let ((pexit, _), (sexit, _)) = pair.wait_exits(WAIT);
        assert_eq!(sexit.action, ExitAction::Continue, "run {i}: {sexit:?}");
        assert!(
            sexit.reason.contains("failover requested"),
            "run {i}: {sexit:?}"
        );
        assert!(sexit.after_checkpoints >= 1);
        assert_eq!(pair.s.protection.status().state, ColoState::FailedOver);
        assert!(!pair.svm().is_paused(), "run {i}: the SVM runs on");
        assert_eq!(pexit.action, ExitAction::Continue, "run {i}: {pexit:?}");
        assert!(
            pexit.reason.contains("the secondary ended protection"),
            "run {i}: {pexit:?}"
        );
        assert!(!pair.pvm().is_paused(), "run {i}: the PVM runs on");
        let (pauses, resumes) = pair.pvm().pause_counts();
        assert_eq!(pauses, resumes, "run {i}");
    }
}

#[test]
fn primary_lost_before_the_first_checkpoint_stops_the_svm() {
    let pair = start_pair(Setup {
        proxy: true,
        ..Setup::default()
    });
    // The stream header, Start and the first 256 KiB of pages of the initial sync (2.5 MiB of
    // data and 2.5 MiB of zero ranges) go through, then the link dies.
    pair.proxy().cut_after(256 << 10);
    let (pexit, _) = pair
        .p
        .obs
        .wait_exit(WAIT)
        .expect("the primary noticed the cut");
    // Either the secondary had read Start (it built the SVM, and now stops it: nothing
    // complete to run), or the cut came before it had (that attempt was no session: it waits
    // for a primary again, no SVM built). Never does it run a VM.
    match pair.s.obs.wait_exit(Duration::from_secs(3)) {
        Some((sexit, _)) => {
            assert_eq!(sexit.action, ExitAction::Stop, "{sexit:?}");
            assert_eq!(sexit.after_checkpoints, 0, "{sexit:?}");
            assert_eq!(pair.s.protection.status().state, ColoState::Stopped);
            assert_eq!(
                pair.s.host.calls.load(std::sync::atomic::Ordering::SeqCst),
                1
            );
            let svm = pair.svm();
            assert!(svm.loaded().is_empty() && svm.ram_writes() == 0);
            assert!(svm.is_paused(), "the SVM never ran");
        }
        None => {
            assert!(pair.s.protection.active());
            assert_eq!(pair.s.protection.status().state, ColoState::Syncing);
            assert_eq!(
                pair.s.host.calls.load(std::sync::atomic::Ordering::SeqCst),
                0,
                "no SVM without a Start"
            );
        }
    }
    assert_eq!(pexit.action, ExitAction::Continue, "{pexit:?}");
    assert_eq!(pexit.after_checkpoints, 0);
    assert!(!pair.pvm().is_paused());
    assert!(pair.p.obs.events("protected").is_empty());
}

#[test]
fn failover_on_secondary_during_the_initial_sync_stops_the_svm() {
    let pair = start_pair(Setup {
        hold_create_vm: true,
        ..Setup::default()
    });
    // The secondary has the Start message and builds the SVM; the first checkpoint cannot
    // complete until create_vm returns.
    assert!(wait_until(WAIT, || pair
        .s
        .host
        .holding
        .load(std::sync::atomic::Ordering::SeqCst)));
    pair.s.protection.failover().unwrap();
    pair.s.host.release();
    let ((pexit, _), (sexit, _)) = pair.wait_exits(WAIT);
    assert_eq!(
        sexit.action,
        ExitAction::Stop,
        "nothing complete to run: {sexit:?}"
    );
    assert_eq!(sexit.after_checkpoints, 0);
    assert!(pair.svm().loaded().is_empty());
    assert_eq!(pexit.action, ExitAction::Continue, "{pexit:?}");
    assert!(!pair.pvm().is_paused());
}

#[test]
fn garbage_connections_are_refused() {
    let config = config_json(&mut Rng::seeded());
    let s = start_secondary_side(&config, true, false);
    let mut rng = Rng::seeded();
    // Random bytes, then gone.
    let mut junk = vec![0u8; 4096];
    rng.fill(&mut junk);
    drop(write_garbage(s.addr, &junk));
    // An HTTP client that waits for its answer.
    let mut http = write_garbage(
        s.addr,
        b"GET /api/v1/vm.info HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n",
    );
    // Random bytes on a connection that stays open.
    let mut junk = vec![0u8; 100];
    rng.fill(&mut junk);
    let open = write_garbage(s.addr, &junk);
    // What looks like a stream header but is not one.
    // (magic, version 1, flags 0, channel 0 of 1, then a bad session/reserved/checksum)
    let mut fake = b"CLVM-MIG\x01\x00\x00\x00\x00\x00\x01\x00".to_vec();
    fake.extend_from_slice(&[0xee; 16]);
    let fake = write_garbage(s.addr, &fake);

    // The secondary answers none of them as a primary and keeps waiting.
    assert_eq!(
        read_some(&mut http, Duration::from_millis(700)).unwrap_or(0),
        0
    );
    assert_eq!(s.host.calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(s.protection.active(), "{:?}", s.obs.exit());
    assert_eq!(s.protection.status().state, ColoState::Syncing);

    // A real primary is protected afterwards.
    let p = start_primary_side(s.addr, &config, 2, Duration::from_millis(50), true);
    let protected = p.obs.wait_event(WAIT, |e| e.name == "protected");
    let sexit = s.obs.exit();
    let pexit = p.obs.exit();
    let _ = p.protection.failover();
    let _ = s.protection.failover();
    drop((open, fake));
    assert!(
        protected.is_some(),
        "the primary was not protected after garbage; primary exit {pexit:?}, secondary exit {sexit:?}"
    );
    assert!(s.host.errors.lock().unwrap().is_empty());
    assert_eq!(s.host.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn an_idle_connection_does_not_lock_out_the_primary() {
    let config = config_json(&mut Rng::seeded());
    let s = start_secondary_side(&config, true, false);
    // A port scanner or health check that connects and says nothing, and a short HTTP/1.0
    // request whose client waits for the answer: both keep their connections open.
    let silent = TcpStream::connect(s.addr).unwrap();
    let short = write_garbage(s.addr, b"GET / HTTP/1.0\r\n\r\n");
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let p = start_primary_side(s.addr, &config, 1, Duration::from_millis(50), true);
    let protected = p.obs.wait_event(WAIT, |e| e.name == "protected");
    let pexit = p.obs.exit();
    let _ = p.protection.failover();
    let _ = s.protection.failover();
    drop((silent, short));
    assert!(
        protected.is_some(),
        "the primary was not protected within {:?} while idle connections were open; \
         primary exit {pexit:?}",
        t0.elapsed()
    );
}

struct Corruption {
    pair: Pair,
    pexit: colo::ColoExit,
    sexit: colo::ColoExit,
}

fn corrupt_a_checkpoint() -> Corruption {
    let pair = start_pair(Setup {
        proxy: true,
        channels: 2,
        ..Setup::default()
    });
    pair.wait_protected();
    pair.wait_checkpoints(3);
    pair.proxy().on_next_state(OnState::Flip);
    let ((pexit, _), (sexit, _)) = pair.wait_exits(WAIT);
    assert_eq!(
        pair.proxy().fired().map(|f| f.0),
        Some("flip"),
        "the proxy flipped a byte of a checkpoint record"
    );
    Corruption { pair, pexit, sexit }
}

#[test]
fn corrupted_checkpoint_record_is_refused() {
    let Corruption { pair, pexit, sexit } = corrupt_a_checkpoint();
    // The SVM is on the previous checkpoint: the corrupted one (the PVM's last saved state)
    // was neither flushed nor loaded.
    let saved = pair.pvm().saved();
    let loaded = pair.svm().loaded();
    assert_eq!(
        loaded.len() + 1,
        saved.len(),
        "all but the corrupted one loaded"
    );
    assert_eq!(loaded.last(), saved.get(saved.len() - 2));
    assert!(!loaded.contains(saved.last().unwrap()));
    assert_eq!(pair.svm().ram_writes_since_load(), 0);
    assert_eq!(sexit.after_checkpoints, loaded.len() as u64);
    assert!(sexit.during_checkpoint, "{sexit:?}");
    // The primary ended protection and its PVM runs.
    assert_eq!(pexit.action, ExitAction::Continue, "{pexit:?}");
    assert!(pexit.during_checkpoint, "{pexit:?}");
    assert_eq!(pexit.after_checkpoints, sexit.after_checkpoints);
    assert!(!pair.pvm().is_paused());
    let (pauses, resumes) = pair.pvm().pause_counts();
    assert_eq!(pauses, resumes);
    assert!(!pair.p.protection.active());
    // The secondary refused it, and said why: to the primary, and in its own exit.
    assert!(
        pexit.reason.contains("corrupt"),
        "the primary hears the secondary's refusal: {pexit:?}"
    );
    assert!(
        sexit.reason.contains("corrupt"),
        "the secondary's exit names the corrupted checkpoint, not a lost primary: {sexit:?}"
    );
}

/// The primary lives on after the secondary refused its checkpoint, so the SVM must not run
/// too (two copies of the VM, one network identity).
#[test]
fn refused_checkpoint_stops_the_svm() {
    let Corruption { pexit, sexit, .. } = corrupt_a_checkpoint();
    assert_eq!(pexit.action, ExitAction::Continue, "{pexit:?}");
    assert_eq!(
        sexit.action,
        ExitAction::Stop,
        "the secondary refused a checkpoint of a live primary and still runs its SVM: {sexit:?}"
    );
}

fn key(text: &str) -> Option<std::sync::Arc<colo::auth::Psk>> {
    Some(std::sync::Arc::new(colo::auth::Psk::parse(text).unwrap()))
}

/// With a pre-shared key on both sides the pair is protected; a primary with no key or the
/// wrong one is refused, and the secondary keeps waiting for the right one.
#[test]
fn only_a_primary_with_the_key_is_protected() {
    let good = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let config = config_json(&mut Rng::seeded());
    SECONDARY_PSK.with(|k| *k.borrow_mut() = key(good));
    let s = start_secondary_side(&config, true, false);

    for (what, psk) in [
        ("no key", None),
        ("the wrong key", key("ffeeddccbbaa99887766554433221100")),
    ] {
        PRIMARY_PSK.with(|k| *k.borrow_mut() = psk);
        let p = start_primary_side(s.addr, &config, 2, Duration::from_millis(50), false);
        let (exit, _) = p
            .obs
            .wait_exit(Duration::from_secs(15))
            .unwrap_or_else(|| panic!("a primary with {what} was not refused"));
        assert!(p.obs.events("protected").is_empty(), "{what}");
        assert_eq!(exit.after_checkpoints, 0, "{what}: {exit:?}");
        assert!(s.protection.active(), "{what}: the secondary gave up");
        assert_eq!(s.protection.status().state, ColoState::Syncing, "{what}");
        assert_eq!(
            s.host.calls.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "{what}: an unauthenticated primary got an SVM built"
        );
    }

    PRIMARY_PSK.with(|k| *k.borrow_mut() = key(good));
    let p = start_primary_side(s.addr, &config, 2, Duration::from_millis(50), false);
    assert!(
        p.obs.wait_event(WAIT, |e| e.name == "protected").is_some(),
        "the primary with the key was not protected: {:?}",
        p.obs.exit()
    );
    assert!(p.obs.wait_event(WAIT, |e| e.name == "checkpoint").is_some());
    let _ = p.protection.failover();
    let _ = s.protection.failover();
}
