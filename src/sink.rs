//! `switchboard sink`: a small local HTTP endpoint for trying workflows. It
//! prints every request it receives (method, path, headers, body) on stdout
//! and answers with a fixed status (200 unless told otherwise), so the quick
//! start's workflow has somewhere on your machine to post to.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use poem::http::StatusCode;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{IntoResponse, Request, Response, Server};

/// Serves until SIGINT/SIGTERM.
pub async fn run(listen: SocketAddr, status: u16) -> anyhow::Result<()> {
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(|s| s.as_u16() >= 200)
        .with_context(|| format!("--status {status} is not an HTTP status: give 200 to 599"))?;
    let acceptor = TcpListener::bind(listen)
        .into_acceptor()
        .await
        .with_context(|| {
            format!(
                "cannot listen on {listen} (is another sink running? pick another with --listen)"
            )
        })?;
    let local = acceptor
        .local_addr()
        .first()
        .and_then(|a| a.as_socket_addr().copied())
        .unwrap_or(listen);
    println!(
        "switchboard sink listening on http://{local}: printing every request, answering {status}"
    );
    let counter = Arc::new(AtomicU64::new(0));
    let endpoint = poem::endpoint::make(move |req: Request| {
        let counter = counter.clone();
        async move { receive(req, status, &counter).await }
    });
    Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(endpoint, shutdown(), None)
        .await?;
    Ok(())
}

async fn receive(mut req: Request, status: StatusCode, counter: &AtomicU64) -> Response {
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    let body = req.take_body().into_vec().await.unwrap_or_default();
    println!("{}", render(n, &req, &body));
    let answer = serde_json::json!({"received": n});
    (status, poem::web::Json(answer)).into_response()
}

/// One request as printed: a header line, the headers, the body (JSON pretty-printed).
fn render(n: u64, req: &Request, body: &[u8]) -> String {
    let mut out = format!(
        "--- #{n} {} {} {}\n",
        chrono::Utc::now().format("%H:%M:%S%.3f"),
        req.method(),
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    for (name, value) in req.headers() {
        out.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    if !body.is_empty() {
        out.push('\n');
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => out.push_str(&serde_json::to_string_pretty(&v).unwrap_or_default()),
            Err(_) => out.push_str(&String::from_utf8_lossy(body)),
        }
        out.push('\n');
    }
    out
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
