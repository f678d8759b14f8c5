//! The network proxy between a real primary and secondary over loopback, without KVM: the
//! mock VMs have a NIC whose filter chain the test drives as a virtio-net worker would (a
//! frame from the tap, a frame the guest sends, what the proxy releases).
//!
//! - a client's frame reaches the PVM and, mirrored, the SVM;
//! - the PVM's reply is held until the SVM sent the same, then released to the tap;
//! - a different reply asks for a checkpoint of reason `divergence`, after which the PVM's
//!   reply goes out;
//! - the SVM never reaches its own tap, and its tap's frames never reach it;
//! - when the secondary is lost, what the PVM holds goes out and its NIC is driven directly;
//!   when the primary is lost, the SVM's frames go to its own tap.

mod common;

use std::time::Duration;

use common::*;
use devices::virtio::net::Direction::{Rx, Tx};
use devices::virtio::net::Verdict;

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: none, allowed over IPv4).
fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
    f.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = 20 + 8 + payload.len();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

const GUEST: [u8; 4] = [10, 0, 0, 2];
const CLIENT: [u8; 4] = [10, 0, 0, 1];

fn request(payload: &[u8]) -> Vec<u8> {
    udp(CLIENT, GUEST, 5353, 53, payload)
}

fn reply(payload: &[u8]) -> Vec<u8> {
    udp(GUEST, CLIENT, 53, 5353, payload)
}

/// The injected frame the test waits for in `dir` of `nic`.
fn wait_injected(nic: &MockNic, dir: devices::virtio::net::Direction) -> Option<Vec<u8>> {
    let mut got = None;
    wait_until(WAIT, || {
        got = nic.injected(dir);
        got.is_some()
    });
    got
}

/// A protected pair whose VMs have NICs; checkpoints only on request or divergence.
fn pair_with_nics(proxy: bool) -> Pair {
    WITH_NICS.with(|n| n.set(true));
    let pair = start_pair(Setup {
        interval: Duration::from_secs(3600),
        pvm_mutates: false,
        svm_mutates: false,
        proxy,
        ..Setup::default()
    });
    WITH_NICS.with(|n| n.set(false));
    pair.wait_protected();
    pair
}

#[test]
fn client_frames_are_mirrored_and_replies_released_on_a_match() {
    let pair = pair_with_nics(false);
    let pvm = pair.pvm().nic().expect("the PVM's NIC");
    let svm = pair.svm().nic().expect("the SVM's NIC");
    assert!(
        pvm.filtered() && svm.filtered(),
        "both NICs carry the proxy"
    );

    let req = request(b"what is the answer?");
    assert_eq!(pvm.process(Rx, &req), (Verdict::Pass, req.clone()));
    assert_eq!(wait_injected(&svm, Rx), Some(req), "mirrored to the SVM");

    let rep = reply(b"42");
    assert_eq!(pvm.process(Tx, &rep).0, Verdict::Hold);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(pvm.injected(Tx), None, "held until the SVM answered");
    assert_eq!(
        svm.process(Tx, &rep).0,
        Verdict::Hold,
        "never to its own tap"
    );
    assert_eq!(wait_injected(&pvm, Tx), Some(rep), "released on the match");

    // The secondary's tap is not the guest's network while protected.
    assert_eq!(svm.process(Rx, &request(b"stray")).0, Verdict::Drop);

    let p = pair.p.protection.status();
    let proxy = p.proxy.expect("the primary's proxy status");
    let c = proxy.primary.expect("primary counters");
    assert_eq!(c.mirrored, 1);
    assert_eq!(c.compare.mismatches, 0);
    assert!(!p.reasons.contains_key("divergence"), "{:?}", p.reasons);
    let s = pair.s.protection.status().proxy.expect("the secondary's");
    let sc = s.secondary.expect("secondary counters");
    assert_eq!((sc.svm_out, sc.tap_dropped), (1, 1));
}

#[test]
fn different_replies_ask_for_a_checkpoint_then_the_pvms_goes_out() {
    let pair = pair_with_nics(false);
    let pvm = pair.pvm().nic().unwrap();
    let svm = pair.svm().nic().unwrap();
    let before = pair.p.protection.status().checkpoints;

    assert_eq!(pvm.process(Tx, &reply(b"uptime 1000")).0, Verdict::Hold);
    assert_eq!(svm.process(Tx, &reply(b"uptime 1003")).0, Verdict::Hold);
    assert_eq!(
        wait_injected(&pvm, Tx),
        Some(reply(b"uptime 1000")),
        "the PVM's answer is the one the client gets"
    );
    assert!(
        wait_until(WAIT, || {
            pair.p.protection.status().reasons.get("divergence") == Some(&1)
        }),
        "{:?}",
        pair.p.protection.status()
    );
    let st = pair.p.protection.status();
    assert!(st.checkpoints > before);
    let proxy = st.proxy.unwrap();
    assert_eq!(proxy.primary.unwrap().compare.mismatches, 1);
    assert!(
        proxy
            .last_divergence
            .as_deref()
            .unwrap_or("")
            .contains("udp"),
        "{:?}",
        proxy.last_divergence
    );
    // After the checkpoint both are in the new epoch: equal replies match again.
    assert!(wait_until(WAIT, || pair.s.protection.status().checkpoints
        == st.checkpoints));
    assert_eq!(pvm.process(Tx, &reply(b"same")).0, Verdict::Hold);
    assert_eq!(svm.process(Tx, &reply(b"same")).0, Verdict::Hold);
    assert_eq!(wait_injected(&pvm, Tx), Some(reply(b"same")));
    assert_eq!(
        pair.p.protection.status().reasons.get("divergence"),
        Some(&1)
    );
}

#[test]
fn a_lost_secondary_releases_what_the_pvm_holds_and_unplugs_the_proxy() {
    let pair = pair_with_nics(true);
    let pvm = pair.pvm().nic().unwrap();
    assert_eq!(pvm.process(Tx, &reply(b"held")).0, Verdict::Hold);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(pvm.injected(Tx), None);
    pair.proxy().cut();
    let (exit, _) = pair.p.obs.wait_exit(WAIT).expect("the primary's exit");
    assert_eq!(exit.action, colo::ExitAction::Continue);
    assert_eq!(wait_injected(&pvm, Tx), Some(reply(b"held")));
    assert!(!pvm.filtered(), "the proxy left the NIC");
    let next = reply(b"direct");
    assert_eq!(pvm.process(Tx, &next), (Verdict::Pass, next.clone()));
}

#[test]
fn a_lost_primary_puts_the_svm_on_its_own_tap() {
    let pair = pair_with_nics(true);
    let svm = pair.svm().nic().unwrap();
    assert_eq!(svm.process(Tx, &reply(b"to the primary")).0, Verdict::Hold);
    pair.proxy().cut();
    let (exit, _) = pair.s.obs.wait_exit(WAIT).expect("the secondary's exit");
    assert_eq!(exit.action, colo::ExitAction::Continue, "{exit:?}");
    let r = reply(b"to the client");
    assert_eq!(svm.process(Tx, &r), (Verdict::Pass, r.clone()));
    let q = request(b"from the client");
    assert_eq!(svm.process(Rx, &q), (Verdict::Pass, q.clone()));
    let st = pair.s.protection.status().proxy.unwrap();
    assert!(st.secondary.unwrap().failed_over);
}
