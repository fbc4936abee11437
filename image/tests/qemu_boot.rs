//! Boots the node image under QEMU with OVMF and a real swtpm, and compares the PCRs the guest
//! reads from its vTPM with the values `constellation_image` precalculated offline.
//!
//! Needs `make install` (qemu-system-x86, ovmf, swtpm, busybox-static, the kernel in tools/)
//! and a built bootstrapper (`cargo build -p constellation-bootstrapper`, or
//! `$CONSTELLATION_BOOTSTRAPPER`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use constellation_attestation::measurements::{Digest, MeasurementsError};
use constellation_image::eventlog::EventLog;
use constellation_image::qemu::{
    self, first_differing_event, Accel, NodeImage, NodeImageInputs, Precalculated, VmConfig,
    EVENTLOG_BEGIN, EVENTLOG_END, PCRS_BEGIN, PCRS_END,
};

/// A boot that has not printed its measurements by then has hung.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn kernel_package() -> PathBuf {
    if let Some(dir) = std::env::var_os("CONSTELLATION_KERNEL_DIR") {
        return dir.into();
    }
    let root = workspace().join("tools/kernel");
    let dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        dirs.len(),
        1,
        "expected exactly one unpacked kernel under {} (run `make image-kernel`), found {dirs:?}",
        root.display()
    );
    dirs[0].clone()
}

fn bootstrapper() -> PathBuf {
    let p = std::env::var_os("CONSTELLATION_BOOTSTRAPPER")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug/constellation-bootstrapper"));
    assert!(
        p.is_file(),
        "bootstrapper binary {} missing: run `cargo build -p constellation-bootstrapper`",
        p.display()
    );
    p
}

fn build(dir: &Path) -> (NodeImage, Duration) {
    let start = Instant::now();
    let inputs = NodeImageInputs::new(&kernel_package(), &bootstrapper());
    let image = NodeImage::build(dir, &inputs, "v-test").expect("image builds");
    (image, start.elapsed())
}

/// QEMU and swtpm of one boot; both are killed when this is dropped, on every path.
struct Vm {
    qemu: Option<Child>,
    swtpm: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        for child in [self.qemu.as_mut(), self.swtpm.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the guest reported on its serial console.
struct Boot {
    pcrs: BTreeMap<u32, Digest>,
    event_log: Vec<u8>,
    /// Host time from QEMU start to the init's first line, and the kernel's uptime then.
    to_init: Duration,
    kernel_uptime: f64,
    to_report: Duration,
    console: Vec<String>,
}

fn accel(scratch: &Path) -> Accel {
    static ACCEL: std::sync::OnceLock<Accel> = std::sync::OnceLock::new();
    *ACCEL.get_or_init(|| {
        qemu::probe_kvm(
            Path::new(qemu::OVMF_CODE),
            Path::new(qemu::OVMF_VARS_TEMPLATE),
            scratch,
            Duration::from_secs(3),
        )
    })
}

fn boot(image: &NodeImage) -> Boot {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let sock = dir.path().join("swtpm.sock");
    let state = dir.path().join("tpm");
    std::fs::create_dir(&state).unwrap();
    let mut vm = Vm {
        qemu: None,
        swtpm: None,
        _dir: dir,
    };
    vm.swtpm = Some(
        Command::new("swtpm")
            .args(["socket", "--tpm2", "--terminate", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", sock.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm starts (apt package swtpm)"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "swtpm socket {} did not appear",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // `--help` makes the bootstrapper print its usage and exit 0, so the init powers off and
    // the test sees the arguments travel through fw_cfg.
    let args = vm._dir.path().join("bootstrapper-args");
    std::fs::write(&args, "--help\n").unwrap();
    // An empty state disk, as every node has one.
    let disk = vm._dir.path().join("state.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    let vars = vm._dir.path().join("OVMF_VARS.fd");
    std::fs::copy(qemu::OVMF_VARS_TEMPLATE, &vars).expect("OVMF vars template (apt package ovmf)");
    let config = VmConfig {
        accel: accel(vm._dir.path()),
        ram_mib: image.manifest.ram_mib,
        firmware_code: qemu::OVMF_CODE.into(),
        firmware_vars: vars,
        tpm_socket: sock,
        kernel: image.kernel_path(),
        initrd: image.initrd_path(),
        cmdline: image.manifest.cmdline.clone(),
        user_net: Some(String::new()),
        state_disk: Some(disk),
        bootstrapper_args: Some(args),
        cluster_nic: None,
    };
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(config.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 starts (apt package qemu-system-x86)");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    vm.qemu = Some(child);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx
                .send((Instant::now(), line.trim_end_matches('\r').to_owned()))
                .is_err()
            {
                break;
            }
        }
    });
    let mut console = Vec::new();
    let mut to_init = None;
    let mut kernel_uptime = 0.0;
    let mut to_report = None;
    let deadline = start + BOOT_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (at, line) = match rx.recv_timeout(left) {
            Ok(x) => x,
            // The guest powered off after the bootstrapper exited: QEMU closed the console.
            Err(mpsc::RecvTimeoutError::Disconnected) if to_report.is_some() => {
                drop(vm);
                let (pcrs, event_log) = parse_report(&console);
                return Boot {
                    pcrs,
                    event_log,
                    to_init: to_init.expect("init line precedes the report"),
                    kernel_uptime,
                    to_report: to_report.unwrap_or_default(),
                    console,
                };
            }
            Err(e) => {
                let tail = console[console.len().saturating_sub(20)..].join("\n");
                panic!(
                    "boot did not report its measurements within {BOOT_TIMEOUT:?} ({e:?}); accel {:?}; console tail:\n{tail}",
                    config.accel
                );
            }
        };
        if to_init.is_none() && line.contains("constellation-init: phase=init") {
            to_init = Some(at - start);
            kernel_uptime = line
                .rsplit("uptime=")
                .next()
                .and_then(|u| u.parse().ok())
                .unwrap_or(0.0);
        }
        if line == EVENTLOG_END {
            to_report = Some(at - start);
        }
        console.push(line);
    }
}

fn section<'a>(console: &'a [String], begin: &str, end: &str) -> &'a [String] {
    let b = console
        .iter()
        .position(|l| l == begin)
        .expect("begin marker");
    let e = console.iter().position(|l| l == end).expect("end marker");
    &console[b + 1..e]
}

fn parse_report(console: &[String]) -> (BTreeMap<u32, Digest>, Vec<u8>) {
    let mut pcrs = BTreeMap::new();
    for line in section(console, PCRS_BEGIN, PCRS_END) {
        let (i, v) = line.split_once(' ').expect("'<index> <hex>'");
        let mut d = [0u8; 32];
        hex::decode_to_slice(v.trim(), &mut d).unwrap_or_else(|e| panic!("PCR line {line:?}: {e}"));
        pcrs.insert(i.parse().unwrap(), d);
    }
    let b64: String = section(console, EVENTLOG_BEGIN, EVENTLOG_END).concat();
    let log = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("event log base64");
    (pcrs, log)
}

/// Every PCR of the policy (enforced and warn-only) whose live value differs, with the first
/// differing event of the guest's log named.
fn differences(pre: &Precalculated, boot: &Boot) -> Vec<String> {
    let log = EventLog::parse(&boot.event_log).expect("guest event log parses");
    let replayed = log.replay();
    let mut out = Vec::new();
    for (&pcr, m) in &pre.measurements.0 {
        let live = boot.pcrs.get(&pcr).copied().unwrap_or([0; 32]);
        if live == m.expected {
            continue;
        }
        let log_value = replayed.get(&pcr).copied().unwrap_or([0; 32]);
        let consistent = if log_value == live {
            "log replays to the live value"
        } else {
            "LOG DOES NOT REPLAY to the live value"
        };
        out.push(format!(
            "PCR {pcr} ({}): precalculated {}, live {}; {consistent}; {}",
            if m.warn_only { "warn-only" } else { "enforced" },
            hex::encode(m.expected),
            hex::encode(live),
            first_differing_event(pcr, &pre.events, &log.events)
        ));
    }
    out
}

#[test]
fn every_precalculated_pcr_matches_the_live_vtpm() {
    let dir = tempfile::tempdir().unwrap();
    let (image, build_time) = build(dir.path());
    let pre = image.precalculate(Path::new(qemu::OVMF_CODE)).unwrap();
    pre.measurements
        .validate()
        .expect("policy enforces PCR 15 and more");
    for pcr in [4, 8, 9, 15] {
        assert!(
            !pre.measurements.0[&pcr].warn_only,
            "PCR {pcr} carries the image and is enforced"
        );
    }
    let boot = boot(&image);
    let diffs = differences(&pre, &boot);
    assert!(
        diffs.is_empty(),
        "precalculated PCRs differ from the live vTPM:\n{}",
        diffs.join("\n")
    );
    // The log the guest saw replays to exactly the PCRs it read: the comparison above
    // covered what the firmware and kernel really measured.
    let replayed = EventLog::parse(&boot.event_log).unwrap().replay();
    for (pcr, v) in &replayed {
        assert_eq!(boot.pcrs[pcr], *v, "PCR {pcr}: event log replay vs live");
    }
    pre.measurements
        .check(&boot.pcrs)
        .expect("policy accepts the live PCRs");
    eprintln!(
        "timing: image build {:.1} s (initrd {} MiB); QEMU start -> init {:.1} s (kernel uptime {:.1} s, so firmware+loading ~{:.1} s); -> measurements printed {:.1} s; console lines {}",
        build_time.as_secs_f64(),
        std::fs::metadata(image.initrd_path()).unwrap().len() >> 20,
        boot.to_init.as_secs_f64(),
        boot.kernel_uptime,
        boot.to_init.as_secs_f64() - boot.kernel_uptime,
        boot.to_report.as_secs_f64(),
        boot.console.len()
    );
}

#[test]
fn an_initrd_changed_after_measurement_fails_pcr_9() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = build(dir.path());
    let pre = image.precalculate(Path::new(qemu::OVMF_CODE)).unwrap();
    // Change one byte of the gzip header's modification time (RFC 1952: bytes 4-7), which the
    // kernel's decompressor ignores: the guest boots the same and reports.
    let mut initrd = std::fs::read(image.initrd_path()).unwrap();
    assert_eq!(initrd[..3], [0x1f, 0x8b, 8], "the initrd is gzip (deflate)");
    initrd[4] ^= 1;
    std::fs::write(image.initrd_path(), &initrd).unwrap();
    let boot = boot(&image);
    let err = pre
        .measurements
        .check(&boot.pcrs)
        .expect_err("the changed initrd must be refused");
    let MeasurementsError::Mismatch(mismatches) = &err else {
        panic!("unexpected error {err}")
    };
    let pcrs: Vec<u32> = mismatches.iter().map(|m| m.index).collect();
    assert_eq!(
        pcrs,
        [9],
        "only the initrd's PCR differs (same size, so PCR 4 holds): {err}"
    );
    assert!(err.to_string().contains("PCR[9]"), "{err}");
    let log = EventLog::parse(&boot.event_log).unwrap();
    let named = first_differing_event(9, &pre.events, &log.events);
    assert!(named.contains("Linux initrd"), "{named}");
}

#[test]
fn two_builds_from_the_same_inputs_are_byte_identical() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (x, _) = build(a.path());
    let (y, _) = build(b.path());
    for f in [
        qemu::KERNEL_FILE,
        qemu::INITRD_FILE,
        qemu::NODE_MANIFEST_FILE,
    ] {
        let (p, q) = (
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
        );
        assert!(p == q, "{f} differs between two builds");
    }
    assert_eq!(x.manifest, y.manifest);
    let fw = Path::new(qemu::OVMF_CODE);
    assert_eq!(x.precalculate(fw).unwrap(), y.precalculate(fw).unwrap());
    assert_eq!(NodeImage::open(a.path()).unwrap(), x);
}
