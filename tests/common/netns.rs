//! Network namespaces as the hosts of a test: a "host" namespace where colovmm runs with its tap
//! on a bridge, and a "client" namespace on the other end of a veth. Everything is deleted on
//! drop, so a failing test leaves nothing behind.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The guest's default address (the test guest's `ip=` default).
pub const GUEST_IP: &str = "192.168.100.2";
/// The client's address.
pub const CLIENT_IP: &str = "192.168.100.1";

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn must(args: &[&str]) {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A host namespace (bridge + pre-created tap) and a client namespace joined by a veth.
pub struct TestNet {
    /// Namespace colovmm runs in.
    pub host: String,
    /// Namespace the client tools run in.
    pub client: String,
    /// The tap colovmm opens (already on the bridge).
    pub tap: String,
}

impl TestNet {
    /// Creates both namespaces and the links; the tap is made with a vnet header, as colovmm
    /// and QEMU open it.
    pub fn create() -> TestNet {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let net = TestNet {
            host: format!("cvm-{id}-h"),
            client: format!("cvm-{id}-c"),
            tap: "tap0".to_string(),
        };
        // Built step by step; Drop removes whatever was made if a step panics.
        must(&["ip", "netns", "add", &net.host]);
        must(&["ip", "netns", "add", &net.client]);
        let h = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &net.host];
            v.extend_from_slice(args);
            must(&v);
        };
        let c = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &net.client];
            v.extend_from_slice(args);
            must(&v);
        };
        must(&[
            "ip",
            "link",
            "add",
            "vh",
            "netns",
            &net.host,
            "type",
            "veth",
            "peer",
            "name",
            "vc",
            "netns",
            &net.client,
        ]);
        h(&["ip", "link", "set", "lo", "up"]);
        h(&["ip", "link", "add", "br0", "type", "bridge"]);
        h(&["ip", "link", "set", "vh", "master", "br0"]);
        h(&[
            "ip", "tuntap", "add", "dev", &net.tap, "mode", "tap", "vnet_hdr",
        ]);
        h(&["ip", "link", "set", &net.tap, "master", "br0"]);
        for dev in ["br0", "vh", net.tap.as_str()] {
            h(&["ip", "link", "set", dev, "up"]);
        }
        c(&["ip", "link", "set", "lo", "up"]);
        c(&["ip", "addr", "add", &format!("{CLIENT_IP}/24"), "dev", "vc"]);
        c(&["ip", "link", "set", "vc", "up"]);
        net
    }

    /// A command that runs `program` inside the client namespace.
    pub fn client_cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.client, program]);
        cmd
    }

    /// Arguments that run a program inside the host namespace (prefix for colovmm/QEMU).
    pub fn host_prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.host]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth pair, bridge and tap inside it.
        let _ = run(&["ip", "netns", "del", &self.host]);
        let _ = run(&["ip", "netns", "del", &self.client]);
    }
}

/// Two VMM hosts and a client on one switch: the topology a migration (and later COLO) needs.
///
/// ```text
///   ns A (source host)        ns B (destination host)       ns C (client)
///   tap0 + va on br0          tap0 + vb on br0              vc 192.168.100.1
///   br0 192.168.100.10        br0 192.168.100.11
///            \__________________ ns S: br0 __________________/
/// ```
pub struct TwoHostNet {
    /// Source host namespace.
    pub a: String,
    /// Destination host namespace.
    pub b: String,
    /// Client namespace.
    pub client: String,
    switch: String,
}

/// Host-side address of host A's bridge.
pub const HOST_A_IP: &str = "192.168.100.10";
/// Host-side address of host B's bridge.
pub const HOST_B_IP: &str = "192.168.100.11";

impl TwoHostNet {
    /// Builds the four namespaces; each host has a `tap0` on its bridge.
    pub fn create() -> TwoHostNet {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let net = TwoHostNet {
            a: format!("cvm-{id}-a"),
            b: format!("cvm-{id}-b"),
            client: format!("cvm-{id}-c"),
            switch: format!("cvm-{id}-s"),
        };
        for ns in [&net.a, &net.b, &net.client, &net.switch] {
            must(&["ip", "netns", "add", ns]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        must(&[
            "ip",
            "-n",
            &net.switch,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
        ]);
        must(&["ip", "-n", &net.switch, "link", "set", "br0", "up"]);
        for (ns, port, ip) in [
            (&net.a, "pa", Some(HOST_A_IP)),
            (&net.b, "pb", Some(HOST_B_IP)),
            (&net.client, "pc", None),
        ] {
            must(&[
                "ip",
                "link",
                "add",
                port,
                "netns",
                &net.switch,
                "type",
                "veth",
                "peer",
                "name",
                "up0",
                "netns",
                ns,
            ]);
            must(&[
                "ip",
                "-n",
                &net.switch,
                "link",
                "set",
                port,
                "master",
                "br0",
            ]);
            must(&["ip", "-n", &net.switch, "link", "set", port, "up"]);
            match ip {
                Some(ip) => {
                    must(&["ip", "-n", ns, "link", "add", "br0", "type", "bridge"]);
                    must(&["ip", "-n", ns, "link", "set", "up0", "master", "br0"]);
                    must(&[
                        "ip", "netns", "exec", ns, "ip", "tuntap", "add", "dev", "tap0", "mode",
                        "tap", "vnet_hdr",
                    ]);
                    must(&["ip", "-n", ns, "link", "set", "tap0", "master", "br0"]);
                    must(&[
                        "ip",
                        "-n",
                        ns,
                        "addr",
                        "add",
                        &format!("{ip}/24"),
                        "dev",
                        "br0",
                    ]);
                    for dev in ["br0", "up0", "tap0"] {
                        must(&["ip", "-n", ns, "link", "set", dev, "up"]);
                    }
                }
                None => {
                    must(&[
                        "ip",
                        "-n",
                        ns,
                        "addr",
                        "add",
                        &format!("{CLIENT_IP}/24"),
                        "dev",
                        "up0",
                    ]);
                    must(&["ip", "-n", ns, "link", "set", "up0", "up"]);
                }
            }
        }
        net
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn cmd_in(ns: &str, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program]);
        cmd
    }
}

impl Drop for TwoHostNet {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.client, &self.switch] {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// Waits until the guest answers ping from namespace `ns` (its NIC is up and routed).
pub fn wait_for_ping(ns: &str, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let ok = Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-c", "1", "-W", "1", GUEST_IP])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
    }
    panic!("guest never answered ping from {ns}");
}
