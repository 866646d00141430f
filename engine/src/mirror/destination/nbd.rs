//! An NBD export as a migration destination: blocking [`NbdClient`]s behind the
//! [`Destination`] interface (over TLS with the job's credentials), its errors naming the
//! export as the operator's target. Mirrored guest writes are pipelined: a batch leaves on
//! one connection in one send, and each write is released by its own reply.
//!
//! The job's requests are spread over [`CONNECTIONS`] connections in turn when the server
//! allows several (`NBD_FLAG_CAN_MULTI_CONN`, as ferry's NBD server does): over TLS one
//! connection is one stream that one thread encrypts here and one decrypts on the server,
//! which bounds the copy rate well below the link's (`docs/BENCHMARKS.md`, *Migration
//! between hosts*). Nothing relies on the order of requests in flight (a chunk written
//! during its copy is copied again, mirrored writes come from several threads), and a
//! flush on one connection covers the writes completed on all of them (what
//! `NBD_FLAG_CAN_MULTI_CONN` promises).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Destination, DestinationError, OwnedWrite};
use crate::nbd::{BlockSizes, ClientError, ClientOptions, ExportUri, NbdClient, PipelinedWrite};
use crate::tls::TlsCredentials;

/// The connections a job opens to an NBD target that allows several.
pub const CONNECTIONS: usize = 4;

/// An NBD export opened for a mirror.
pub struct NbdDestination {
    name: Arc<str>,
    /// [`CONNECTIONS`] clients, or one; never empty.
    clients: Vec<NbdClient>,
    /// The client of the next request, modulo their number.
    next: AtomicUsize,
}

impl NbdDestination {
    /// Connects to the export and negotiates it. A read-only export is refused (a migration
    /// writes to it), and so is one whose minimum block size exceeds `request_block_bytes`,
    /// what every request of the job is whole multiples of. With `tls` the connection uses
    /// TLS (see [`ClientOptions::tls`]).
    pub fn connect(
        uri: &ExportUri,
        request_timeout: Duration,
        request_block_bytes: u64,
        tls: Option<Arc<TlsCredentials>>,
    ) -> Result<Self, DestinationError> {
        let name = uri.to_string();
        let options = ClientOptions {
            request_timeout,
            accept_read_only: false,
            request_block_bytes,
            tls,
        };
        let first = NbdClient::connect(uri, &options).map_err(|e| destination_error(&name, e))?;
        // A server that does not allow several connections (qemu-nbd's default
        // `--shared=1`) may not even answer a second one: it gets one.
        let count = if first.can_multi_conn() {
            CONNECTIONS
        } else {
            1
        };
        let mut clients = vec![first];
        for _ in 1..count {
            clients
                .push(NbdClient::connect(uri, &options).map_err(|e| destination_error(&name, e))?);
        }
        Ok(Self {
            name: name.into(),
            clients,
            next: AtomicUsize::new(0),
        })
    }

    /// The client for the next request (in turn).
    fn client(&self) -> &NbdClient {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        &self.clients[index]
    }

    fn err(&self, e: ClientError) -> DestinationError {
        destination_error(&self.name, e)
    }
}

/// A client's error as the destination's, with the same words after the target's name.
fn destination_error(target: &str, e: ClientError) -> DestinationError {
    let target = target.to_string();
    match e {
        ClientError::Connect { source } => DestinationError::Connect { target, source },
        ClientError::Handshake { reason } => DestinationError::Handshake { target, reason },
        ClientError::Unusable { reason } => DestinationError::Unusable { target, reason },
        ClientError::Disconnected { reason } => DestinationError::Disconnected { target, reason },
        ClientError::Refused {
            op,
            offset_bytes,
            errno,
        } => DestinationError::Refused {
            target,
            op,
            offset_bytes,
            errno,
        },
    }
}

impl Destination for NbdDestination {
    fn describe(&self) -> String {
        self.name.to_string()
    }

    fn size_bytes(&self) -> u64 {
        self.clients[0].size_bytes()
    }

    fn write_at(&self, offset_bytes: u64, data: &[u8]) -> Result<(), DestinationError> {
        self.client()
            .write_at(offset_bytes, data)
            .map_err(|e| self.err(e))
    }

    fn write_zeroes(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
    ) -> Result<(), DestinationError> {
        self.client()
            .write_zeroes(offset_bytes, len_bytes, unmap)
            .map_err(|e| self.err(e))
    }

    fn read_at(&self, offset_bytes: u64, buf: &mut [u8]) -> Result<(), DestinationError> {
        self.client()
            .read_at(offset_bytes, buf)
            .map_err(|e| self.err(e))
    }

    fn flush(&self) -> Result<(), DestinationError> {
        // Several clients only to a server with `NBD_FLAG_CAN_MULTI_CONN`, where a flush
        // on one connection covers the writes completed on every one.
        self.clients[0].flush().map_err(|e| self.err(e))
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn pipelines_writes(&self) -> bool {
        true
    }

    fn send_writes(&self, writes: &mut Vec<OwnedWrite>) {
        let mut pipelined: Vec<PipelinedWrite<'_>> = writes
            .iter_mut()
            .map(|write| {
                let done = std::mem::replace(&mut write.done, Box::new(|_| {}));
                let name = self.name.clone();
                PipelinedWrite {
                    offset_bytes: write.offset_bytes,
                    data: &write.data,
                    done: Box::new(move |result| {
                        done(result.map_err(|e| destination_error(&name, e)))
                    }),
                }
            })
            .collect();
        // One batch, one connection: its writes leave in one send.
        self.client().send_writes(&mut pipelined);
        drop(pipelined);
        // Sent: the data is in the connection's hands (a pipelined write's bytes are copied
        // into its batch before `send_writes` returns).
        writes.clear();
    }

    fn expire_overdue(&self) {
        for client in &self.clients {
            client.expire_overdue();
        }
    }

    fn close(&self) {
        for client in &self.clients {
            client.close("the target was closed");
        }
    }

    fn block_sizes(&self) -> Option<BlockSizes> {
        Some(self.clients[0].block_sizes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::protocol::NBD_CMD_DISC;
    use crate::nbd::tests::fake_server::{block_size_info, fake_server, served};
    use crate::nbd::NbdAddress;

    /// A minimum block size above a sector is refused at connect, the message naming the
    /// target and both sizes.
    #[test]
    fn a_minimum_block_size_above_a_sector_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("s");
        let server = fake_server(&socket, 1 << 20, vec![block_size_info(4096, 4096, 1 << 20)])?;
        let uri = ExportUri {
            address: NbdAddress::Unix { socket },
            export: "e".into(),
            tls: false,
        };
        let refused = NbdDestination::connect(&uri, crate::nbd::REQUEST_TIMEOUT_DEFAULT, 512, None);
        let Err(e @ DestinationError::Unusable { .. }) = refused else {
            return Err(format!("not refused as unusable: {:?}", refused.err()).into());
        };
        assert_eq!(
            e.to_string(),
            format!(
                "target {uri}: the export's minimum block size is 4096 bytes; ferry's volumes \
                 take 512-byte requests"
            )
        );
        assert_eq!(served(server)?.requests, vec![(NBD_CMD_DISC, 0, 0)]);
        Ok(())
    }
}
