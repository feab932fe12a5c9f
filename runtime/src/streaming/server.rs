//! The streaming server's HTTP side: `/{exec,attach,portforward}/TOKEN`,
//! the token's request checked, the upgrade to WebSocket or SPDY/3.1
//! negotiated; every failure is a plain-text HTTP error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, info_span, warn, Instrument};

use super::portforward::{self, PodNetwork};
use super::spdy::{self, Session};
use super::token::{Request, TokenError, Tokens};
use super::websocket::{self, Framing};
use super::{remotecommand, StreamingError};
use crate::manager::{CriError, Manager};

/// SPDY streams must all arrive within this long of the upgrade.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that has not sent its request head by then is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The SPDY header naming the remote-command subprotocols.
const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
const WEBSOCKET_PORTFORWARD_PROTOCOLS: &[&str] = &[
    "portforward.k8s.io",
    "v4.channel.k8s.io",
    "channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "base64.channel.k8s.io",
];

type Body = Full<Bytes>;

pub struct Streaming {
    manager: Arc<Manager>,
    tokens: Tokens,
    base_url: String,
}

/// An HTTP error with its reason, for the client.
struct Refusal(StatusCode, String);

impl Refusal {
    fn response(self) -> Response<Body> {
        let mut response = Response::new(Full::new(Bytes::from(format!("{}\n", self.1))));
        *response.status_mut() = self.0;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }
}

impl From<CriError> for Refusal {
    fn from(e: CriError) -> Self {
        let status = match &e {
            CriError::NotFound(_) => StatusCode::NOT_FOUND,
            CriError::FailedPrecondition(_) => StatusCode::CONFLICT,
            CriError::Unimplemented(_) => StatusCode::NOT_IMPLEMENTED,
            CriError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Refusal(status, e.to_string())
    }
}

enum Wire {
    WebSocket,
    Spdy,
}

impl Streaming {
    /// Binds the server's address; the URLs name the address it got.
    pub async fn bind(
        addr: SocketAddr,
        manager: Arc<Manager>,
        token_ttl: Duration,
    ) -> std::io::Result<(Arc<Streaming>, TcpListener)> {
        let listener = TcpListener::bind(addr).await?;
        let mut local = listener.local_addr()?;
        if local.ip().is_unspecified() {
            // Clients on this node (kubelet, crictl) reach it on loopback.
            local.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let streaming = Arc::new(Streaming {
            manager,
            tokens: Tokens::new(token_ttl),
            base_url: format!("http://{local}"),
        });
        Ok((streaming, listener))
    }

    /// A URL for `request`, usable once.
    pub fn url(&self, request: Request) -> Result<String, CriError> {
        let kind = request.kind();
        let token = self.tokens.insert(request)?;
        Ok(format!("{}/{kind}/{token}", self.base_url))
    }

    /// Accepts connections until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        info!(url = %self.base_url, "streaming server listening");
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("streaming server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, std::convert::Infallible>(me.handle(req).await) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
                if let Err(e) = served {
                    debug!(%peer, "streaming connection: {e}");
                }
            });
        }
    }

    async fn handle(self: Arc<Self>, req: HttpRequest<Incoming>) -> Response<Body> {
        let span = info_span!("stream", method = %req.method(), path = %req.uri().path());
        match self.clone().upgrade(req).instrument(span.clone()).await {
            Ok(response) => response,
            Err(refusal) => {
                span.in_scope(|| info!(status = %refusal.0, "refused: {}", refusal.1));
                refusal.response()
            }
        }
    }

    async fn upgrade(
        self: Arc<Self>,
        mut req: HttpRequest<Incoming>,
    ) -> Result<Response<Body>, Refusal> {
        let path = req.uri().path().trim_start_matches('/').to_owned();
        let Some((kind, token)) = path.split_once('/') else {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                format!("no such path: /{path}"),
            ));
        };
        if !matches!(kind, "exec" | "attach" | "portforward") {
            return Err(Refusal(
                StatusCode::NOT_FOUND,
                format!("no such path: /{path}"),
            ));
        }
        if !matches!(*req.method(), Method::GET | Method::POST) {
            return Err(Refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not allowed here: use GET or POST", req.method()),
            ));
        }
        let wire = wire(req.headers())?;
        let request = self.tokens.take(kind, token).map_err(|e| {
            let status = match e {
                TokenError::Expired(_) => StatusCode::GONE,
                _ => StatusCode::NOT_FOUND,
            };
            Refusal(status, e.to_string())
        })?;
        // The target may have gone since the URL was handed out.
        match &request {
            Request::Exec(r) => {
                self.manager.running_container(&r.container_id).await?;
            }
            Request::Attach(r) => {
                self.manager.running_container(&r.container_id).await?;
                self.manager.attach_point(&r.container_id)?;
            }
            Request::PortForward(r) => {
                portforward::forwardable_pod(&self.manager, &r.pod_sandbox_id)?;
            }
        }
        let offered = offered_protocols(req.headers(), &wire);
        let ours: &[&str] = match (&request, &wire) {
            (Request::PortForward(_), Wire::WebSocket) => WEBSOCKET_PORTFORWARD_PROTOCOLS,
            (Request::PortForward(_), Wire::Spdy) => spdy::PORTFORWARD_PROTOCOLS,
            (_, Wire::WebSocket) => websocket::PROTOCOLS,
            (_, Wire::Spdy) => spdy::EXEC_PROTOCOLS,
        };
        // No protocol offered: the oldest one, as kubelet does.
        let protocol = if offered.is_empty() {
            String::new()
        } else {
            offered
                .iter()
                .find(|p| ours.contains(&p.as_str()))
                .cloned()
                .ok_or_else(|| {
                    Refusal(
                        StatusCode::FORBIDDEN,
                        format!(
                            "unable to upgrade: unable to negotiate protocol: client supports \
                             {offered:?}, server supports {ours:?}"
                        ),
                    )
                })?
        };
        let ports = match &request {
            Request::PortForward(_) if matches!(wire, Wire::WebSocket) => {
                ports(req.uri().query().unwrap_or_default())?
            }
            _ => Vec::new(),
        };
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        match wire {
            Wire::WebSocket => {
                let key = req
                    .headers()
                    .get(header::SEC_WEBSOCKET_KEY)
                    .ok_or_else(|| {
                        Refusal(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key".into())
                    })?;
                let accept = derive_accept_key(key.as_bytes());
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(header::SEC_WEBSOCKET_ACCEPT, header_value(&accept)?);
                if !protocol.is_empty() {
                    headers.insert(header::SEC_WEBSOCKET_PROTOCOL, header_value(&protocol)?);
                }
            }
            Wire::Spdy => {
                headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
                if !protocol.is_empty() {
                    headers.insert(PROTOCOL_HEADER, header_value(&protocol)?);
                }
            }
        }
        let upgrading = hyper::upgrade::on(&mut req);
        let span = match &request {
            Request::Exec(r) => {
                info_span!("exec", container = %r.container_id, tty = r.tty, %protocol)
            }
            Request::Attach(r) => {
                info_span!("attach", container = %r.container_id, tty = r.tty, %protocol)
            }
            Request::PortForward(r) => {
                info_span!("portforward", pod = %r.pod_sandbox_id, %protocol)
            }
        };
        let manager = self.manager.clone();
        tokio::spawn(
            async move {
                let io = match upgrading.await {
                    Ok(upgraded) => TokioIo::new(upgraded),
                    Err(e) => {
                        warn!("upgrade failed: {e}");
                        return;
                    }
                };
                info!("session starts");
                let result = match wire {
                    Wire::WebSocket => {
                        let socket = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
                        serve_websocket(manager, request, socket, &protocol, ports).await
                    }
                    Wire::Spdy => serve_spdy(manager, request, Session::start(io), &protocol).await,
                };
                match result {
                    Ok(()) => info!("session ends"),
                    Err(e) => info!("session ends: {e}"),
                }
            }
            .instrument(span),
        );
        Ok(response)
    }
}

fn header_value(value: &str) -> Result<HeaderValue, Refusal> {
    HeaderValue::from_str(value).map_err(|_| {
        Refusal(
            StatusCode::BAD_REQUEST,
            format!("bad header value {value:?}"),
        )
    })
}

/// Which upgrade the client asks for.
fn wire(headers: &HeaderMap) -> Result<Wire, Refusal> {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !connection_upgrade {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: missing upgrade headers in request (Connection: Upgrade, and \
             Upgrade: websocket or SPDY/3.1)"
                .into(),
        ));
    }
    if upgrade.eq_ignore_ascii_case("websocket") {
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                "unable to upgrade: WebSocket version 13 is required".into(),
            ));
        }
        Ok(Wire::WebSocket)
    } else if upgrade.eq_ignore_ascii_case("SPDY/3.1") {
        Ok(Wire::Spdy)
    } else {
        Err(Refusal(
            StatusCode::BAD_REQUEST,
            format!("unable to upgrade: Upgrade {upgrade:?}: expected websocket or SPDY/3.1"),
        ))
    }
}

/// The subprotocols the client offers, in its order.
fn offered_protocols(headers: &HeaderMap, wire: &Wire) -> Vec<String> {
    let name = match wire {
        Wire::WebSocket => header::SEC_WEBSOCKET_PROTOCOL.as_str(),
        Wire::Spdy => PROTOCOL_HEADER,
    };
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// WebSocket port-forward's `?port=N&port=M`.
fn ports(query: &str) -> Result<Vec<u16>, Refusal> {
    let ports: Vec<u16> = query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("port="))
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| Refusal(StatusCode::BAD_REQUEST, format!("bad port {p:?}")))
        })
        .collect::<Result<_, _>>()?;
    if ports.is_empty() || ports.len() > 64 {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "port-forward needs between 1 and 64 port=N query parameters".into(),
        ));
    }
    Ok(ports)
}

async fn serve_websocket(
    manager: Arc<Manager>,
    request: Request,
    socket: websocket::Socket,
    protocol: &str,
    ports: Vec<u16>,
) -> Result<(), StreamingError> {
    let framing = Framing::of(protocol);
    match request {
        Request::Exec(_) | Request::Attach(_) => {
            let (sink, stream) = socket.split();
            let (input_tx, input) = mpsc::channel(16);
            let (output, output_rx) = mpsc::channel(16);
            let reader = tokio::spawn(websocket::read_input(stream, framing, input_tx));
            let command = remotecommand::run(manager, request, input, output);
            remotecommand::drive(websocket::Wire { sink, framing }, output_rx, command).await;
            reader.abort();
            Ok(())
        }
        Request::PortForward(r) => {
            let network = PodNetwork::of(&manager, &r.pod_sandbox_id).await?;
            portforward::over_websocket(socket, framing, network, ports).await;
            Ok(())
        }
    }
}

async fn serve_spdy(
    manager: Arc<Manager>,
    request: Request,
    mut session: Session,
    protocol: &str,
) -> Result<(), StreamingError> {
    match request {
        Request::Exec(_) | Request::Attach(_) => {
            let wanted = remote_command_streams(&request, protocol);
            let mut early = Vec::new();
            let ids = tokio::time::timeout(
                STREAM_CREATION_TIMEOUT,
                session.accept(&wanted, &mut early),
            )
            .await
            .map_err(|_| {
                StreamingError::Spdy(format!(
                    "the client did not open its streams {wanted:?} within {STREAM_CREATION_TIMEOUT:?}"
                ))
            })??;
            let (input_tx, input) = mpsc::channel(16);
            let (output, output_rx) = mpsc::channel(16);
            let events = std::mem::replace(&mut session.events, mpsc::channel(1).1);
            let reader = tokio::spawn(spdy::read_exec_input(
                events,
                early,
                ids.get("stdin").copied(),
                ids.get("resize").copied(),
                input_tx,
            ));
            let wire = spdy::ExecWire {
                writer: session.writer.clone(),
                stdout: ids.get("stdout").copied(),
                stderr: ids.get("stderr").copied(),
                error: ids.get("error").copied(),
                json_status: protocol == "v4.channel.k8s.io",
            };
            let command = remotecommand::run(manager, request, input, output);
            remotecommand::drive(wire, output_rx, command).await;
            reader.abort();
            Ok(())
        }
        Request::PortForward(r) => {
            let network = PodNetwork::of(&manager, &r.pod_sandbox_id).await?;
            portforward::over_spdy(session, network).await;
            Ok(())
        }
    }
}

/// The streams a remote-command client opens for this request.
fn remote_command_streams(request: &Request, protocol: &str) -> Vec<&'static str> {
    let (stdin, stdout, stderr, tty) = match request {
        Request::Exec(r) => (r.stdin, r.stdout, r.stderr, r.tty),
        Request::Attach(r) => (r.stdin, r.stdout, r.stderr, r.tty),
        Request::PortForward(_) => return Vec::new(),
    };
    let mut wanted = vec!["error"];
    if stdin {
        wanted.push("stdin");
    }
    if stdout {
        wanted.push("stdout");
    }
    if stderr && !tty {
        wanted.push("stderr");
    }
    if tty && matches!(protocol, "v3.channel.k8s.io" | "v4.channel.k8s.io") {
        wanted.push("resize");
    }
    wanted
}
