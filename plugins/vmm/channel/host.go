package channel

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Client starts a session over rw, a fresh connection to the guest's end
// (the VM's virtio-serial socket, or any byte stream to a Listener). It
// sends a reset, preceded by the sync filler, until the guest acknowledges
// it or ctx is done; a hello from the guest makes it resend at once. The
// Conn owns rw: rw is closed when the session ends. On error rw is closed.
func Client(ctx context.Context, rw io.ReadWriteCloser, opts ...Option) (*Conn, error) {
	o := defaults(opts)
	session, err := newSession()
	if err != nil {
		rw.Close()
		return nil, err
	}
	w := newWriter(rw)
	c := newConn(w, session, Addr{Side: "host", Path: o.path}, Addr{Side: "guest", Path: o.path})
	var closeOnce sync.Once
	c.onClose = func(*Conn) { closeOnce.Do(func() { rw.Close() }) }

	h := &handshake{acked: make(chan struct{}), hello: make(chan struct{}, 1), failed: make(chan struct{})}
	go h.demux(newReader(rw), c)

	deadline, _ := ctx.Deadline()
	send := func() error {
		if err := w.write(typeReset, session, nil, true, deadline); err != nil {
			c.end(err)
			return fmt.Errorf("channel: sending reset: %w", err)
		}
		return nil
	}
	if err := send(); err != nil {
		return nil, err
	}
	lastSent := time.Now()
	interval := o.retryMin
	timer := time.NewTimer(interval)
	defer timer.Stop()
	for {
		select {
		case <-h.acked:
			return c, nil
		case <-h.failed:
			c.mu.Lock()
			err := c.err
			c.mu.Unlock()
			return nil, fmt.Errorf("channel: handshake: %w", err)
		case <-ctx.Done():
			c.end(ctx.Err())
			return nil, fmt.Errorf("channel: no answer from the guest: %w", ctx.Err())
		case <-h.hello:
			if time.Since(lastSent) < o.retryMin/4 {
				continue // the guest repeats its hello; do not flood it
			}
			if !timer.Stop() {
				<-timer.C
			}
		case <-timer.C:
			interval = min(2*interval, o.retryMax)
		}
		if err := send(); err != nil {
			return nil, err
		}
		lastSent = time.Now()
		timer.Reset(interval)
	}
}

// DialUnix connects to a Unix socket where the guest's channel is served
// (QEMU's `-chardev socket,server=on`), retrying until the socket accepts
// or ctx is done, and starts a session with Client.
func DialUnix(ctx context.Context, path string, opts ...Option) (*Conn, error) {
	var d net.Dialer
	backoff := 2 * time.Millisecond
	for {
		nc, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			if o := defaults(opts); o.peerCheck != nil {
				if err := o.peerCheck(nc); err != nil {
					nc.Close()
					return nil, fmt.Errorf("channel: %s: %w", path, err)
				}
			}
			return Client(ctx, nc, append([]Option{WithPath(path)}, opts...)...)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("channel: connecting to %s: %w (last error: %v)", path, ctx.Err(), err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 100*time.Millisecond)
	}
}

type handshake struct {
	mu          sync.Mutex
	established bool
	acked       chan struct{}
	hello       chan struct{}
	failed      chan struct{}
}

// demux reads the guest's frames for the host's session until it ends.
func (h *handshake) demux(r *reader, c *Conn) {
	defer close(h.failed)
	for {
		f, err := r.next()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				err = fmt.Errorf("channel: read: %w", err)
			}
			c.end(err)
			return
		}
		h.mu.Lock()
		est := h.established
		h.mu.Unlock()
		switch f.typ {
		case typeResetAck:
			if f.session == c.session && !est {
				h.mu.Lock()
				h.established = true
				h.mu.Unlock()
				close(h.acked)
			}
		case typeHello:
			if est {
				// A guest that says hello has no session: ours is gone.
				c.end(ErrPeerRestarted)
				return
			}
			c.hello, c.helloAt = append([]byte(nil), f.payload...), time.Now()
			select {
			case h.hello <- struct{}{}:
			default:
			}
		case typeData:
			if est && f.session == c.session && !c.deliver(f.payload) {
				return
			}
		case typeClose:
			if est && f.session == c.session {
				c.end(io.EOF)
				return
			}
		}
	}
}

func newSession() (uint32, error) {
	var b [4]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return 0, err
		}
		if s := binary.BigEndian.Uint32(b[:]); s != 0 {
			return s, nil
		}
	}
}
