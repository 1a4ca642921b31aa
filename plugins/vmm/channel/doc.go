// Package channel is the host<->guest link of kuasar-vmm: a session layer
// over a byte stream that has no connection semantics of its own, such as
// a virtio-serial port, on which ttrpc runs (a session is a net.Conn).
//
// The daemon (host) reaches the guest agent through a Unix socket QEMU
// serves for a virtio-serial port; the agent (guest) reads and writes the
// port's device. Neither end knows when the other came or went: a daemon
// that restarts reconnects to a guest that may still hold half of a frame
// the old daemon sent, a guest restored from a snapshot holds whatever was
// in flight when it was saved, and bytes the host writes before the guest
// opens its port are lost. This package makes each host connection a
// fresh, clean session.
//
// # Frames
//
// Both directions carry frames: a 20-byte header (magic 0xB5 0x4B, version,
// type, session, payload length, CRC-32C of the payload, CRC-32C of the
// header) and at most MaxPayload bytes. A reader looks for the magic,
// checks the header's CRC (so that a length is trusted only from a real
// header), waits for the payload and checks its CRC; any check that fails
// skips one byte and looks again, so garbage or the cut end of an old
// frame is skipped and a frame that begins inside it is still found.
//
// # Handshake
//
//	host                                       guest
//	  connect to the socket                      open the port
//	                                 <- HELLO    (at once, then every
//	                                              500 ms while idle)
//	  SYNC + RESET(S) ->                         (resent with backoff,
//	                                              and at once on a HELLO)
//	                                 <- SYNC + RESET_ACK(S)
//	  DATA(S) <->  DATA(S)                       a new session S: the
//	                                              previous one ends
//	  CLOSE(S) -> or <- CLOSE(S)                 either side ends it
//
// S is a random non-zero 32-bit number chosen by the host for each
// connection. SYNC is MaxPayload+20 zero bytes: it completes any frame the
// receiver may be stuck inside (a header that promised more bytes than
// ever came), which then fails its CRC and is skipped; zeros never hold a
// magic. Frames of any other session are dropped, so stale data of an
// earlier session can never reach the new one.
//
// The guest ends its session when the host side closes (its port reads
// io.EOF: virtio-serial's way to say no host is connected), drops any half
// frame it holds, and polls the port until a host connects again. A host
// that hears HELLO during a session knows the guest lost it (the agent or
// the VM restarted): its session ends with ErrPeerRestarted. A host whose
// session ends for any reason closes its socket and dials again (Client or
// DialUnix); ttrpc clients are made anew on each session.
//
// vsock (where /dev/vhost-vsock exists) is connection-oriented and needs
// none of this: a ttrpc client dials the agent's vsock port directly.
package channel
