//! Connection event loops: one single-threaded runtime per thread, each serving the
//! connections handed to it from accept to end.
//!
//! A relayed statement is a chain of wake-ups: the agent's bytes arrive, the proxy writes
//! them to Postgres, Postgres answers, the proxy writes the answer back. On a work-stealing
//! runtime each of those wake-ups may land on another worker thread than the last, and every
//! hop is a futex wake and a cold cache. Pinning a connection to one loop for its life (as
//! pgbouncer's single event loop does, with one loop per core here) keeps its two directions,
//! their reads and writes, on one thread. The control plane (authz, approvals, the recorder's
//! shipper) stays on the process's own runtime; a loop only talks to it through channels.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

/// The loops of one proxy.
pub struct EventLoops {
    loops: Vec<Loop>,
    next: AtomicUsize,
}

struct Loop {
    handle: Handle,
    /// Every connection on the loop holds a clone; the loop's thread ends when, after the
    /// stop, the last one is dropped.
    live: Option<mpsc::Sender<()>>,
    stop: Option<oneshot::Sender<()>>,
}

impl EventLoops {
    /// Starts `count` loops (0: one per core).
    pub fn start(count: usize, name: &str) -> io::Result<EventLoops> {
        let count = match count {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut loops = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = runtime.handle().clone();
            let (live, mut drained) = mpsc::channel::<()>(1);
            let (stop, stopped) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("{name}-loop-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        // Stopped (or the proxy dropped): accept nothing new, serve the
                        // connections still open to their end, then let the thread go.
                        let _ = stopped.await;
                        // Nothing is ever sent: this returns when every sender is gone.
                        let _ = drained.recv().await;
                    });
                })?;
            loops.push(Loop {
                handle,
                live: Some(live),
                stop: Some(stop),
            });
        }
        Ok(EventLoops {
            loops,
            next: AtomicUsize::new(0),
        })
    }

    /// Hands an accepted connection to the next loop (round robin), which runs `serve` on
    /// it there. The socket moves to that loop's reactor, so its readiness events wake that
    /// loop's thread only.
    pub fn serve<F, Fut>(&self, socket: TcpStream, serve: F) -> io::Result<()>
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let socket = socket.into_std()?;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.loops.len();
        let target = &self.loops[i];
        let live = target.live.clone();
        target.handle.spawn(async move {
            let _live = live;
            // Registered with the reactor of the runtime this runs on: the loop's.
            if let Ok(socket) = TcpStream::from_std(socket) {
                serve(socket).await;
            }
        });
        Ok(())
    }
}

impl Drop for EventLoops {
    fn drop(&mut self) {
        for l in &mut self.loops {
            l.live = None;
            if let Some(stop) = l.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Each connection is served on a loop thread, round robin, and one still open when the
    /// loops are dropped (the proxy stopped) is served on to its end.
    #[tokio::test]
    async fn connections_run_on_the_loops_and_outlive_a_stop() {
        let loops = EventLoops::start(2, "t").expect("loops");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut clients = Vec::new();
        for _ in 0..3 {
            let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (socket, _) = listener.accept().await.expect("accept");
            loops
                .serve(socket, |mut socket| async move {
                    // Names the thread serving it, then echoes one line after another.
                    let name = std::thread::current().name().unwrap_or("?").to_owned();
                    let _ = socket.write_all(format!("{name}\n").as_bytes()).await;
                    let mut buf = [0u8; 64];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                })
                .expect("serve");
            clients.push(client);
        }
        let mut names = Vec::new();
        for c in &mut clients {
            let mut buf = [0u8; 32];
            let n = c.read(&mut buf).await.expect("read");
            names.push(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
        }
        assert_eq!(names, ["t-loop-0", "t-loop-1", "t-loop-0"]);
        drop(loops);
        for c in &mut clients {
            c.write_all(b"still here").await.expect("write");
            let mut buf = [0u8; 32];
            let n = c.read(&mut buf).await.expect("read");
            assert_eq!(&buf[..n], b"still here");
        }
    }
}
