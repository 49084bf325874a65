//! A listener for `axum::serve` whose connections are admitted in tasks of their own (a TLS
//! handshake, a PROXY protocol header), so a slow or silent client never holds up the accept
//! loop or the clients behind it. The engine API and the proxy's browser port use it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

pub struct Admitted<Io, Addr> {
    ready: mpsc::Receiver<(Io, Addr)>,
    local: Addr,
}

impl<Io: Send + 'static, Addr: Send + 'static> Admitted<Io, Addr> {
    /// Accepts on `tcp` and runs `admit` for each connection in a task of its own; what it
    /// returns is served, `None` is dropped. `admit` bounds its own time.
    pub fn spawn<F, Fut>(tcp: TcpListener, local: Addr, admit: F) -> Self
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<(Io, Addr)>> + Send + 'static,
    {
        let (tx, ready) = mpsc::channel(64);
        let admit = Arc::new(admit);
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = tcp.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if tx.is_closed() {
                    return;
                }
                let (tx, admitted) = (tx.clone(), admit(stream, peer));
                tokio::spawn(async move {
                    if let Some(conn) = admitted.await {
                        let _ = tx.send(conn).await;
                    }
                });
            }
        });
        Self { ready, local }
    }
}

/// TLS, each handshake within `limit`.
pub fn tls(tcp: TcpListener, config: Arc<rustls::ServerConfig>, limit: Duration) -> std::io::Result<Admitted<TlsStream<TcpStream>, SocketAddr>> {
    let local = tcp.local_addr()?;
    let acceptor = TlsAcceptor::from(config);
    Ok(Admitted::spawn(tcp, local, move |stream, peer| {
        let handshake = acceptor.accept(stream);
        async move { Some((tokio::time::timeout(limit, handshake).await.ok()?.ok()?, peer)) }
    }))
}

impl<Io, Addr> axum::serve::Listener for Admitted<Io, Addr>
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Addr: Clone + Send + 'static,
{
    type Io = Io;
    type Addr = Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local.clone())
    }
}
