//! The metadata service end to end: the `virtio_mmds` guest (see
//! `guests/virtio_mmds.c`) resolves 169.254.169.254 with ARP, opens TCP
//! connections to it and sends HTTP requests through its virtio-net
//! driver, and reports the answers on the serial port; the store comes
//! from `--metadata` and the service from `mmds-config`. The interface's
//! TAP sits in a network namespace with the host's address: the guest's
//! ARP for the host and a UDP datagram to it must still cross the TAP,
//! while nothing for the service does (the host kernel would answer
//! nothing for 169.254.169.254: every answer comes from Ember).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use ember_tests::netns::{recv_datagram, NetNs};
use ember_tests::{default_config, guest_path, merge_patch, Launch, Output};
use serde_json::{json, Value};

const TAP: &str = "embm0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const WAIT: Duration = Duration::from_secs(20);

fn metadata() -> Value {
    json!({"latest": {"meta-data": {"ami-id": "ami-12345678", "tags": {"env": "test"}}}})
}

/// Runs the guest with `mmds_config` and the store from `--metadata`;
/// returns its output and the datagram the host received.
fn run(mmds_config: Value, args: &str) -> (Output, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let metadata_path = dir.path().join("metadata.json");
    std::fs::write(&metadata_path, metadata().to_string()).unwrap();
    let mut config = default_config(&guest_path("virtio_mmds"));
    merge_patch(
        &mut config,
        &json!({
            "boot-source": {"boot_args": format!("console=ttyS0 net.ip=10.201.0.2 net.host_ip={HOST_IP} {args}")},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": "06:00:0a:c9:00:02"}],
            "mmds-config": mmds_config,
        }),
    );
    let mut ns = NetNs::new().expect("create a network namespace");
    ns.add_tap(TAP, &format!("{HOST_IP}/24"))
        .expect("create the TAP");
    let socket = ns
        .run(|| {
            let s = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 7001))?;
            s.set_read_timeout(Some(WAIT))?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("enter the namespace")
        .expect("bind the host socket");
    let vm = ns
        .wrap(Launch::new(&config).arg("--metadata").arg(&metadata_path))
        .timeout(WAIT)
        .spawn()
        .expect("start ember in the namespace");
    let mut buf = [0u8; 2048];
    let datagram = match recv_datagram(&socket, &mut buf) {
        Ok((len, _)) => buf[..len].to_vec(),
        Err(_) => Vec::new(),
    };
    let out = vm.wait(WAIT).expect("ember exits after the guest resets");
    assert!(out.status.success(), "{out}");
    assert!(
        out.stdout.lines().any(|l| l == "virtio_mmds done"),
        "the guest did not finish\n{out}"
    );
    (out, datagram)
}

/// The guest's answer to request `name`: status and body.
fn answer<'a>(out: &'a Output, name: &str) -> (u32, &'a str) {
    let prefix = format!("mmds: {name} ");
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no answer to {name}\n{out}"));
    let (status, body) = line.split_once(' ').unwrap_or((line, ""));
    (status.parse().unwrap_or_else(|_| panic!("{line}")), body)
}

fn check_common(out: &Output, datagram: &[u8]) {
    assert!(
        out.stdout
            .contains("mmds: arp 169.254.169.254 is at 06:01:23:45:67:01"),
        "{out}"
    );
    // Other traffic still crosses the TAP: the host kernel answered ARP
    // and received the datagram.
    assert!(out.stdout.contains("mmds: host 10.201.0.1 is at "), "{out}");
    assert_eq!(datagram, b"mmds done", "{out}");
}

#[test]
fn v1_answers_json_and_text_without_a_token() {
    let (out, datagram) = run(json!({"network_interfaces": ["eth0"]}), "");
    check_common(&out, &datagram);
    assert_eq!(answer(&out, "get"), (200, "ami-12345678"));
    assert_eq!(answer(&out, "get-json"), (200, "\"ami-12345678\""));
    let (status, token) = answer(&out, "token");
    assert_eq!(status, 200);
    assert_eq!(token.len(), 64, "{out}");
    assert_eq!(answer(&out, "get-token"), (200, "ami-12345678"));
}

#[test]
fn v1_lists_keys_as_imds_text() {
    let (out, datagram) = run(
        json!({"network_interfaces": ["eth0"]}),
        "mmds.path=/latest/meta-data/",
    );
    check_common(&out, &datagram);
    // Keys one per line (the guest prints newlines as '|'), objects with '/'.
    assert_eq!(answer(&out, "get"), (200, "ami-id|tags/"));
    assert_eq!(
        answer(&out, "get-json"),
        (200, r#"{"ami-id":"ami-12345678","tags":{"env":"test"}}"#)
    );
}

#[test]
fn v2_needs_a_session_token() {
    let (out, datagram) = run(json!({"version": "V2", "network_interfaces": ["eth0"]}), "");
    check_common(&out, &datagram);
    let (status, body) = answer(&out, "get");
    assert_eq!(status, 401, "{out}");
    assert!(body.starts_with("No MMDS token provided."), "{body}");
    assert_eq!(answer(&out, "get-json").0, 401);
    assert_eq!(answer(&out, "token").0, 200);
    assert_eq!(answer(&out, "get-token"), (200, "ami-12345678"));
}

#[test]
fn another_address_is_served_and_the_default_one_is_not() {
    let (out, _) = run(
        json!({"network_interfaces": ["eth0"], "ipv4_address": "169.254.170.2"}),
        "mmds.ip=169.254.170.2",
    );
    assert!(
        out.stdout
            .contains("mmds: arp 169.254.170.2 is at 06:01:23:45:67:01"),
        "{out}"
    );
    assert_eq!(answer(&out, "get"), (200, "ami-12345678"));
}

#[test]
fn imds_compat_answers_text_whatever_the_accept_header() {
    let (out, _) = run(
        json!({"network_interfaces": ["eth0"], "imds_compat": true}),
        "",
    );
    assert_eq!(answer(&out, "get"), (200, "ami-12345678"));
    assert_eq!(answer(&out, "get-json"), (200, "ami-12345678"));
}

mod api {
    use ember_tests::api::ApiVm;
    use ember_tests::guest_path;
    use serde_json::json;

    #[test]
    fn the_api_configures_and_fills_the_store_before_boot() {
        let vm = ApiVm::spawn(&["--id", "mmds-api", "--mmds-size-limit", "64"]).unwrap();
        let mut api = vm.client().unwrap();
        // Firecracker's answer before anything: an empty store.
        let r = api.get("/mmds").unwrap();
        assert_eq!((r.status, r.json()), (200, json!({})));
        let r = api
            .put("/mmds/config", &json!({"network_interfaces": ["eth0"]}))
            .unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(
            r.fault_message(),
            "MMMDS config error: The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface."
        );
        let r = api.patch("/mmds", &json!({"a": 1})).unwrap();
        assert_eq!(
            (r.status, r.fault_message().as_str()),
            (400, "MMDS error: The MMDS data store is not initialized.")
        );
        let r = api
            .put(
                "/network-interfaces/eth0",
                &json!({"iface_id": "eth0", "host_dev_name": "embmapi0"}),
            )
            .unwrap();
        assert_eq!(r.status, 204, "{}", r.body);
        let r = api
            .put(
                "/mmds/config",
                &json!({"version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "169.254.0.9"}),
            )
            .unwrap();
        assert_eq!(
            (r.status, r.fault_message().as_str()),
            (
                400,
                "MMMDS config error: The MMDS IPv4 address is not link local."
            )
        );
        let r = api
            .put(
                "/mmds/config",
                &json!({"version": "V2", "network_interfaces": ["eth0"]}),
            )
            .unwrap();
        assert_eq!(r.status, 204, "{}", r.body);
        let config = api.get("/vm/config").unwrap().json();
        assert_eq!(
            config["mmds-config"],
            json!({"version": "V2", "network_interfaces": ["eth0"],
                   "ipv4_address": "169.254.169.254", "imds_compat": false})
        );
        assert_eq!(
            api.put("/mmds", &json!({"a": {"b": "c"}})).unwrap().status,
            204
        );
        assert_eq!(
            api.patch("/mmds", &json!({"a": {"d": "e"}}))
                .unwrap()
                .status,
            204
        );
        let r = api.get("/mmds").unwrap();
        assert_eq!(r.json(), json!({"a": {"b": "c", "d": "e"}}));
        // Over --mmds-size-limit: 413, and the store is unchanged.
        let r = api.patch("/mmds", &json!({"big": "x".repeat(64)})).unwrap();
        assert_eq!(
            (r.status, r.fault_message().as_str()),
            (
                413,
                "MMDS limit exceeded error: The MMDS patch request doesn't fit."
            )
        );
        assert_eq!(
            api.get("/mmds").unwrap().json(),
            json!({"a": {"b": "c", "d": "e"}})
        );
        vm.kill();
    }

    #[test]
    fn after_boot_the_store_is_served_only_if_mmds_was_set_up() {
        let boot = |args: &[&str]| {
            let vm = ApiVm::spawn(args).unwrap();
            let mut api = vm.client().unwrap();
            let r = api
                .put(
                    "/boot-source",
                    &json!({"kernel_image_path": guest_path("counter"), "boot_args": "console=ttyS0"}),
                )
                .unwrap();
            assert_eq!(r.status, 204);
            let r = api
                .put("/actions", &json!({"action_type": "InstanceStart"}))
                .unwrap();
            assert_eq!(r.status, 204, "{}", r.body);
            (vm, api)
        };
        let (vm, mut api) = boot(&["--id", "mmds-none"]);
        let r = api.get("/mmds").unwrap();
        assert_eq!(
            (r.status, r.fault_message().as_str()),
            (400, "MMDS error: The MMDS data store is not initialized.")
        );
        assert_eq!(
            api.put("/mmds/config", &json!({"network_interfaces": []}))
                .unwrap()
                .status,
            400
        );
        vm.kill();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(&path, r#"{"k": "v"}"#).unwrap();
        let (vm, mut api) = boot(&["--id", "mmds-file", "--metadata", path.to_str().unwrap()]);
        assert_eq!(api.get("/mmds").unwrap().json(), json!({"k": "v"}));
        assert_eq!(
            api.patch("/mmds", &json!({"k": null, "n": 1}))
                .unwrap()
                .status,
            204
        );
        assert_eq!(api.get("/mmds").unwrap().json(), json!({"n": 1}));
        assert_eq!(api.put("/mmds", &json!({"m": 2})).unwrap().status, 204);
        assert_eq!(api.get("/mmds").unwrap().json(), json!({"m": 2}));
        vm.kill();
    }
}
