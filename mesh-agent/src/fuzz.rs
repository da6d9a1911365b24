//! Fuzz targets for what the agent reads from others: policy YAML, a
//! CONNECT's authority and metadata headers, a certificate request, an API
//! object, a TLS ClientHello at the ingress gateway. Each is an
//! ignored test that `cargo xtask fuzz` runs for a bounded time: inputs
//! start from the seeds in `fuzz/corpus/<target>/`, are mutated (bit
//! flips, byte edits, chunk copies, splices of two inputs, tokens of the
//! input's language), and one that panics is written to
//! `fuzz/artifacts/<target>/` and fails the run. No coverage feedback: it
//! runs on stable, in the unit tests' build, without a sanitizer toolchain.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Time per target: `MESH_FUZZ_SECONDS`, else 60 s.
fn budget() -> Duration {
    let secs = std::env::var("MESH_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    Duration::from_secs_f64(secs)
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// xorshift64*: fast and reproducible from `MESH_FUZZ_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Inputs kept past this size are cut: the parsers' cost grows with it
/// and big inputs find little more than small ones.
const MAX_INPUT: usize = 16 * 1024;

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>], tokens: &[&[u8]]) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                input.insert(i, rng.next() as u8);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = rng.below(len - i).max(1);
                input.drain(i..i + n);
            }
            4 if len > 0 => {
                // Copy a chunk of the input somewhere else in it.
                let i = rng.below(len);
                let n = rng.below((len - i).min(64)).max(1);
                let chunk = input[i..i + n].to_vec();
                let at = rng.below(len + 1);
                input.splice(at..at, chunk);
            }
            5 if !tokens.is_empty() => {
                let t = tokens[rng.below(tokens.len())];
                let at = rng.below(len + 1);
                input.splice(at..at, t.iter().copied());
            }
            6 if !corpus.is_empty() => {
                // Splice: our head, another input's tail.
                let other = &corpus[rng.below(corpus.len())];
                let at = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            _ => {
                let interesting: [u8; 8] = [0, 0xff, 0x7f, 0x80, b'\n', b':', b'"', b'-'];
                let at = rng.below(len + 1);
                input.insert(at, interesting[rng.below(interesting.len())]);
            }
        }
    }
    input.truncate(MAX_INPUT);
}

/// Runs `target` on mutations of the seeds for the time budget; a panic
/// fails the test with the input saved. Returns the executions.
fn run(name: &str, tokens: &[&[u8]], target: impl Fn(&[u8])) -> u64 {
    let dir = fuzz_dir().join("corpus").join(name);
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(!corpus.is_empty(), "no seeds in {}", dir.display());
    let seed = std::env::var("MESH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15_u64);
    let mut rng = Rng(seed | 1);
    let budget = budget();
    let start = Instant::now();
    let mut execs = 0u64;
    // Quiet while inputs run: a panic is reported below with its input.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut crash = None;
    'outer: while start.elapsed() < budget {
        // Seeds as they are, then mutations of a random corpus entry.
        for _ in 0..256 {
            let input = if (execs as usize) < corpus.len() {
                corpus[execs as usize].clone()
            } else {
                let mut input = corpus[rng.below(corpus.len())].clone();
                mutate(&mut rng, &mut input, &corpus, tokens);
                input
            };
            execs += 1;
            if let Err(e) = catch_unwind(AssertUnwindSafe(|| target(&input))) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                crash = Some((input, msg));
                break 'outer;
            }
            // Keep a few mutants as new starting points (no coverage to
            // choose by: one in 64, bounded).
            if corpus.len() < 512 && rng.below(64) == 0 {
                corpus.push(input);
            }
        }
    }
    std::panic::set_hook(hook);
    if let Some((input, msg)) = crash {
        let out = fuzz_dir().join("artifacts").join(name);
        std::fs::create_dir_all(&out).expect("artifacts directory");
        let file = out.join(format!("crash-{execs}"));
        std::fs::write(&file, &input).expect("writing the crashing input");
        panic!(
            "fuzz {name}: panic after {execs} executions: {msg}; input saved to {}",
            file.display()
        );
    }
    println!(
        "fuzz {name}: {execs} executions in {:.1} s, no crash ({} corpus entries)",
        start.elapsed().as_secs_f64(),
        corpus.len()
    );
    execs
}

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

pub fn policy_yaml(data: &[u8]) {
    let doc = crate::state::Document::parse_text("fuzz.yaml", &text(data));
    let opts = crate::state::StoreOptions::for_tests();
    let store = crate::state::Store::from_documents([&doc], &opts);
    // What the agent does with a snapshot: dump it for /config_dump.
    let _ = serde_json::to_string(&store.dump());
}

pub fn hbone_connect(data: &[u8]) {
    let Ok(uri) = hyper::Uri::try_from(data) else {
        return;
    };
    if let Some(dst) = crate::proxy::hbone::connect_destination(&uri) {
        // What was accepted is exactly an address and a port.
        let again: std::net::SocketAddr = dst.to_string().parse().expect("round trip");
        assert_eq!(again, dst);
    }
    if let Some(crate::proxy::hbone::Authority::Host(host, port)) =
        crate::proxy::hbone::connect_authority(&uri)
    {
        // A hostname is only ever a DNS name, lower case, with its port.
        let _ = port;
        assert!(!host.is_empty());
        assert!(
            host.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'),
            "{host:?}"
        );
    }
}

/// One input read as each metadata header an HBONE server reads from a
/// CONNECT: `baggage`, `traceparent`, `forwarded`.
pub fn hbone_headers(data: &[u8]) {
    if let Some(b) = crate::proxy::hbone::Baggage::parse(data)
        && let Some((kind, _)) = &b.workload
    {
        // A kind read from a key is only ever key characters.
        assert!(!kind.is_empty(), "{b:?}");
        assert!(
            kind.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_'),
            "{b:?}"
        );
    }
    if let Some(tp) = crate::proxy::hbone::traceparent(data) {
        // What was accepted prints as a version-00 header that reads back.
        let printed = tp.to_string();
        assert_eq!(
            crate::proxy::hbone::traceparent(printed.as_bytes()),
            Some(tp)
        );
    }
    if let Ok(v) = hyper::header::HeaderValue::from_bytes(data) {
        let mut h = hyper::HeaderMap::new();
        h.insert("forwarded", v);
        if let Some(host) = crate::proxy::hbone::forwarded_host(&h) {
            assert!(!host.is_empty());
        }
    }
}

/// A PEM request as is; anything else is taken as DER and wrapped in PEM,
/// so that mutations reach the PKCS#10 parser and not only base64's.
pub fn csr(data: &[u8]) {
    let pem = if data.starts_with(b"-----BEGIN") {
        text(data)
    } else {
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64(data)
        )
    };
    let _ = crate::identity::ca_server::csr::Csr::parse(&pem, "cluster.local");
}

fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The first bytes of a connection to an ingress gateway's HTTPS port: the
/// ClientHello read for its SNI, and the name then matched against
/// listener hostnames.
pub fn tls_hello(data: &[u8]) {
    if let Some(Some(name)) = crate::waypoint::read_hello(data) {
        assert!(!name.is_empty());
        for pattern in ["shop.example.com", "*.example.com"] {
            let _ = crate::state::hostname_matches(pattern, &name);
        }
        let _ = crate::state::host_only(&name);
    }
}

pub fn k8s_object(data: &[u8]) {
    crate::cluster::source::fuzz_object(data);
}

#[test]
#[ignore = "run by `cargo xtask fuzz`"]
fn fuzz_policy_yaml() {
    let tokens: &[&[u8]] = &[
        b"\n---\n",
        b"kind: AuthorizationPolicy\n",
        b"kind: PeerAuthentication\n",
        b"kind: Pod\n",
        b"kind: Service\n",
        b"kind: List\nitems:\n- ",
        b"action: DENY\n",
        b"ports: [\"8080\"]\n",
        b"ipBlocks: [\"10.0.0.0/8\"]\n",
        b"principals: [\"*\"]\n",
        b"mode: STRICT\n",
        b"portLevelMtls:\n  \"8080\": {mode: DISABLE}\n",
        b"  - ",
        b": ",
        b"&a ",
        b"*a",
        b"!!binary ",
        b"{}",
        b"[]",
        b"\"\\u0000\"",
        b"99999999999999999999",
    ];
    run("policy_yaml", tokens, policy_yaml);
}

#[test]
#[ignore = "run by `cargo xtask fuzz`"]
fn fuzz_hbone_connect() {
    let tokens: &[&[u8]] = &[
        b"[", b"]", b":", b"::ffff:", b"%25eth0", b"65535", b"65536", b"@", b"/", b"*",
    ];
    run("hbone_connect", tokens, hbone_connect);
}

#[test]
#[ignore = "run by `cargo xtask fuzz`"]
fn fuzz_hbone_headers() {
    let tokens: &[&[u8]] = &[
        b",", b";", b"=", b"%", b"%2C", b"k8s.", b".name", b"00-", b"-", b"ff", b"host=", b"\"",
    ];
    run("hbone_headers", tokens, hbone_headers);
}

#[test]
#[ignore = "run by `cargo xtask fuzz`"]
fn fuzz_csr() {
    let tokens: &[&[u8]] = &[
        b"-----BEGIN CERTIFICATE REQUEST-----\n",
        b"\n-----END CERTIFICATE REQUEST-----\n",
        b"spiffe://cluster.local/ns/a/sa/b",
        b"MII",
        b"==",
    ];
    run("csr", tokens, csr);
}

#[test]
#[ignore = "run by `cargo xtask fuzz`"]
fn fuzz_k8s_object() {
    let tokens: &[&[u8]] = &[
        b"\"metadata\":{\"name\":\"a\",\"namespace\":\"b\"}",
        b"\"spec\":",
        b"\"status\":{\"podIPs\":[{\"ip\":\"10.0.0.1\"}]}",
        b"\"labels\":{\"istio.io/dataplane-mode\":\"ambient\"}",
        b"null",
        b"[]",
        b"{}",
        b"1e999",
        b"\"\\ud800\"",
    ];
    run("k8s_object", tokens, k8s_object);
}

#[test]
#[ignore = "run by `cargo xtask fuzz`"]
fn fuzz_tls_hello() {
    let tokens: &[&[u8]] = &[
        b"\x16\x03\x01",
        b"\x00\x00",
        b"\x00\x10",
        b"\xff\xff",
        b"shop.example.com",
        b"*.",
        b"\x00",
    ];
    run("tls_hello", tokens, tls_hello);
}

#[test]
fn the_tls_hello_seeds_are_client_hellos() {
    let read = |f: &str| std::fs::read(fuzz_dir().join("corpus/tls_hello").join(f)).unwrap();
    assert_eq!(
        crate::waypoint::read_hello(&read("sni.bin")),
        Some(Some("shop.example.com".into()))
    );
    assert_eq!(crate::waypoint::read_hello(&read("no-sni.bin")), Some(None));
}

#[test]
fn a_der_seed_reaches_the_csr_checks() {
    let der = std::fs::read(fuzz_dir().join("corpus/csr/web.der")).unwrap();
    let pem = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64(&der)
    );
    let csr = crate::identity::ca_server::csr::Csr::parse(&pem, "cluster.local")
        .expect("the seed is a valid request");
    assert_eq!(
        csr.identity.to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
}

/// The driver itself: mutations stay bounded and a panic is caught with
/// its input saved.
#[test]
fn a_panicking_target_is_reported_with_its_input() {
    let name = "selftest";
    let dir = fuzz_dir().join("corpus").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("seed"), b"abc").unwrap();
    let result = std::panic::catch_unwind(|| {
        run(name, &[b"boom"], |d| {
            assert!(!d.windows(4).any(|w| w == b"boom"), "found it");
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
    let artifacts = fuzz_dir().join("artifacts").join(name);
    let saved: Vec<_> = std::fs::read_dir(&artifacts).unwrap().flatten().collect();
    let _ = std::fs::remove_dir_all(&artifacts);
    let msg = result.expect_err("the target's panic fails the run");
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("found it"), "{msg}");
    assert_eq!(saved.len(), 1);
}
