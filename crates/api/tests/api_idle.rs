//! The API thread sleeps while it has nothing to do, even when a client
//! has hung up while the VMM is still working on its request. Alone in its
//! own test binary so no other server thread shares the process.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use ember_api::{start_api_server, VmmData, DEFAULT_MAX_PAYLOAD, THREAD_NAME};

/// User plus system CPU time of the API thread, in clock ticks.
fn api_thread_cpu_ticks() -> u64 {
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != THREAD_NAME {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the ")" closing the command name: state is field 3,
        // utime and stime are fields 14 and 15 (proc(5)).
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        let utime: u64 = fields[11].parse().unwrap();
        let stime: u64 = fields[12].parse().unwrap();
        return utime + stime;
    }
    panic!("no {THREAD_NAME} thread");
}

#[test]
fn a_client_that_hangs_up_while_the_vmm_works_costs_no_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let api = start_api_server(&path, DEFAULT_MAX_PAYLOAD).unwrap();

    let mut client = UnixStream::connect(&path).unwrap();
    client.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
    drop(client);

    let (_action, responder) = api.recv().unwrap();
    let before = api_thread_cpu_ticks();
    // The VMM takes its time; the API thread must wait, not spin.
    thread::sleep(Duration::from_millis(600));
    let spent = api_thread_cpu_ticks() - before;
    responder.respond(Ok(VmmData::Version("x".into())));
    // 600 ms of spinning would be about 60 ticks at 100 Hz.
    assert!(spent <= 5, "the API thread used {spent} ticks while idle");

    // Still serving afterwards.
    let mut c = UnixStream::connect(&path).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (_action, responder) = api.recv().unwrap();
    responder.respond(Ok(VmmData::Empty));
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut c, &mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");
}
