package channel

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// Errors of a session.
var (
	// ErrPeerRestarted ends a host session whose guest said hello again:
	// it lost the session (the agent or the VM restarted).
	ErrPeerRestarted = errors.New("channel: the guest restarted")
	// ErrSuperseded ends a guest session when the host starts a new one.
	ErrSuperseded = errors.New("channel: the host started a new session")
)

// maxBuffered bounds the bytes a session holds for a reader that does not
// read; past it the stream is no longer read (back pressure).
const maxBuffered = 1 << 20

// writer serialises frames onto the byte stream shared by every session
// of one link. A write may block for long (a virtio-serial port blocks
// while no host is connected), so taking the writer is bounded by the
// write's deadline.
type writer struct {
	sem chan struct{} // holds one token: the right to write
	w   io.Writer
	b   []byte
}

func newWriter(w io.Writer) *writer {
	wr := &writer{sem: make(chan struct{}, 1), w: w}
	wr.sem <- struct{}{}
	return wr
}

// deadliner is what a stream offers to bound a write (net.Conn, os.File).
type deadliner interface{ SetWriteDeadline(time.Time) error }

// write writes one frame, preceded by the sync filler when sync is set.
func (w *writer) write(typ byte, session uint32, payload []byte, sync bool, deadline time.Time) error {
	_, err := w.writeIf(nil, typ, session, payload, sync, deadline)
	return err
}

// writeIf is write, done only if cond (unless nil) holds once the writer
// is taken: what cond checks cannot change between the check and the
// frame unless it changes by a write. It reports whether it wrote.
func (w *writer) writeIf(cond func() bool, typ byte, session uint32, payload []byte, sync bool, deadline time.Time) (bool, error) {
	if deadline.IsZero() {
		<-w.sem
	} else {
		t := time.NewTimer(time.Until(deadline))
		select {
		case <-w.sem:
			t.Stop()
		case <-t.C:
			return false, os.ErrDeadlineExceeded
		}
	}
	defer func() { w.sem <- struct{}{} }()
	if cond != nil && !cond() {
		return false, nil
	}
	w.b = w.b[:0]
	if sync {
		w.b = append(w.b, make([]byte, syncLen)...)
	}
	w.b = appendFrame(w.b, typ, session, payload)
	if d, ok := w.w.(deadliner); ok {
		if err := d.SetWriteDeadline(deadline); err != nil && !errors.Is(err, os.ErrNoDeadline) {
			return false, err
		}
	}
	_, err := w.w.Write(w.b)
	if len(w.b) > 4*syncLen {
		w.b = nil // do not keep a large buffer
	}
	return true, err
}

// Conn is one session of a channel: a reliable, ordered byte stream as a
// net.Conn (ttrpc runs over it). It ends when either side closes it, the
// host starts another session, the guest restarts, or the link fails.
type Conn struct {
	w       *writer
	session uint32
	local   Addr
	remote  Addr
	// onClose runs once when the session ends (the side's bookkeeping).
	onClose func(*Conn)

	mu       sync.Mutex
	cond     *sync.Cond
	chunks   [][]byte
	buffered int
	err      error // why the session ended; reads return it once drained
	closed   bool  // Close was called locally
	rdl, wdl time.Time
	rtimer   *time.Timer

	// hello is the guest's hello payload, as the host got it.
	hello   []byte
	helloAt time.Time
}

func newConn(w *writer, session uint32, local, remote Addr) *Conn {
	c := &Conn{w: w, session: session, local: local, remote: remote}
	c.cond = sync.NewCond(&c.mu)
	return c
}

// Session returns the session's identifier.
func (c *Conn) Session() uint32 { return c.session }

// Hello returns the guest's last hello before this session (on the host
// side), and when it arrived: zero if the guest was already waiting for a
// session when the host connected.
func (c *Conn) Hello() ([]byte, time.Time) { return c.hello, c.helloAt }

// deliver queues payload for Read; it blocks while the reader lags more
// than maxBuffered behind, and reports false if the session is over.
func (c *Conn) deliver(payload []byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.err == nil && c.buffered >= maxBuffered {
		c.cond.Wait()
	}
	if c.err != nil {
		return false
	}
	c.chunks = append(c.chunks, append([]byte(nil), payload...))
	c.buffered += len(payload)
	c.cond.Broadcast()
	return true
}

// end marks the session over with err (io.EOF for an orderly end). It
// reports whether this call ended it.
func (c *Conn) end(err error) bool {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return false
	}
	c.err = err
	c.cond.Broadcast()
	c.mu.Unlock()
	if c.onClose != nil {
		c.onClose(c)
	}
	return true
}

// Read reads the session's stream.
func (c *Conn) Read(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.chunks) == 0 {
		if c.closed {
			return 0, net.ErrClosed
		}
		if c.err != nil {
			return 0, c.err
		}
		if !c.rdl.IsZero() && !time.Now().Before(c.rdl) {
			return 0, os.ErrDeadlineExceeded
		}
		c.cond.Wait()
	}
	n := 0
	for n < len(p) && len(c.chunks) > 0 {
		k := copy(p[n:], c.chunks[0])
		n += k
		if k == len(c.chunks[0]) {
			c.chunks[0] = nil
			c.chunks = c.chunks[1:]
		} else {
			c.chunks[0] = c.chunks[0][k:]
		}
	}
	c.buffered -= n
	c.cond.Broadcast()
	return n, nil
}

// Write writes to the session's stream, in frames of at most MaxPayload.
func (c *Conn) Write(p []byte) (int, error) {
	n := 0
	for {
		dl, err := c.writable()
		if err != nil {
			return n, err
		}
		chunk := p[:min(len(p), MaxPayload)]
		if len(chunk) == 0 {
			return n, nil
		}
		if err := c.w.write(typeData, c.session, chunk, false, dl); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return n, err
			}
			err = fmt.Errorf("channel: write: %w", err)
			c.end(err)
			return n, err
		}
		n += len(chunk)
		p = p[len(chunk):]
	}
}

// writable returns the write deadline, or why the session cannot be
// written to.
func (c *Conn) writable() (time.Time, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.closed:
		return c.wdl, net.ErrClosed
	case c.err == io.EOF:
		return c.wdl, io.ErrClosedPipe
	case c.err != nil:
		return c.wdl, c.err
	case !c.wdl.IsZero() && !time.Now().Before(c.wdl):
		return c.wdl, os.ErrDeadlineExceeded
	}
	return c.wdl, nil
}

// Close ends the session, telling the peer.
func (c *Conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	live := c.err == nil
	c.mu.Unlock()
	if live {
		_ = c.w.write(typeClose, c.session, nil, false, time.Now().Add(time.Second))
	}
	c.end(net.ErrClosed)
	return nil
}

// LocalAddr names this side of the channel.
func (c *Conn) LocalAddr() net.Addr { return c.local }

// RemoteAddr names the other side.
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline sets both deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	_ = c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// SetReadDeadline bounds Read.
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rdl = t
	if c.rtimer != nil {
		c.rtimer.Stop()
		c.rtimer = nil
	}
	if !t.IsZero() {
		c.rtimer = time.AfterFunc(time.Until(t), func() {
			c.mu.Lock()
			c.cond.Broadcast()
			c.mu.Unlock()
		})
	}
	c.cond.Broadcast()
	return nil
}

// SetWriteDeadline bounds Write (where the underlying stream supports
// deadlines, a write blocked in it too).
func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wdl = t
	return nil
}

// Addr is the address of one side of a channel.
type Addr struct {
	Side string // "host" or "guest"
	Path string // the socket or device the channel runs over
}

// Network returns "kuasar-channel".
func (Addr) Network() string { return "kuasar-channel" }

func (a Addr) String() string { return a.Side + ":" + a.Path }

// live reports whether the session has not ended.
func (c *Conn) live() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err == nil
}
