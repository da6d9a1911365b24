//! The HTTP application the waypoint tests run in pods (`mesh-testapp
//! http-serve ADDR NAME`): HTTP/1.1 and HTTP/2 cleartext on one port. Every
//! answer is one JSON line saying who served it and what arrived (method,
//! path with query, version, headers, body size), so a test sees the
//! request as the backend saw it. `/status/N` answers with status N;
//! `/slow...` answers after 5 s; `/sleep/MS` after MS milliseconds;
//! `/fail-if/NAME` answers 503 when the server is NAME; `/bytes/N` answers
//! N bytes; `/seen/PATH`
//! answers how many requests for `/PATH` it has served; an `Upgrade`
//! request is switched (101) and its bytes echoed.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{LazyLock, Mutex},
};

/// Requests served, by path.
static SEEN: LazyLock<Mutex<HashMap<String, u64>>> = LazyLock::new(Mutex::default);

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};

pub fn serve(addr: SocketAddr, name: String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        println!("listening {addr}");
        use std::io::Write as _;
        std::io::stdout().flush().expect("stdout");
        loop {
            let Ok((s, peer)) = l.accept().await else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| answer(name.clone(), peer, req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}

async fn answer(
    name: String,
    peer: SocketAddr,
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.headers().contains_key("upgrade") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Ok(Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("x-server", name)
            .body(Full::new(Bytes::new()))
            .expect("valid response"));
    }
    if let Some(n) = req
        .uri()
        .path()
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; n]))));
    }
    if let Some(path) = req.uri().path().strip_prefix("/seen") {
        let n = SEEN.lock().expect("seen").get(path).copied().unwrap_or(0);
        return Ok(Response::new(Full::new(Bytes::from(format!("{n}\n")))));
    }
    *SEEN
        .lock()
        .expect("seen")
        .entry(req.uri().path().to_owned())
        .or_default() += 1;
    let (parts, body) = req.into_parts();
    if let Some(ms) = parts
        .uri
        .path()
        .strip_prefix("/sleep/")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let failing = parts
        .uri
        .path()
        .strip_prefix("/fail-if/")
        .is_some_and(|n| n == name);
    if parts.uri.path().starts_with("/slow") {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
    let body_bytes = match body.collect().await {
        Ok(b) => b.to_bytes().len(),
        Err(_) => 0,
    };
    let mut headers = serde_json::Map::new();
    for (k, v) in &parts.headers {
        headers.insert(
            k.as_str().to_owned(),
            serde_json::Value::String(v.to_str().unwrap_or("").to_owned()),
        );
    }
    let status = parts
        .uri
        .path()
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(if failing { 503 } else { 200 });
    let out = serde_json::json!({
        "server": name,
        "peer": peer.to_string(),
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut text = out.to_string();
    text.push('\n');
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("valid response"))
}
