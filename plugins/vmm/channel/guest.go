package channel

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// Port is the guest's end of the byte stream, typically a virtio-serial
// port (/dev/vportNpM). It outlives sessions and host connections: Read
// returns io.EOF while the host side is closed (no host connected), and
// works again once a host connects. Writes made while no host is
// connected may block until one is, or be lost.
type Port io.ReadWriteCloser

// Listener is the guest's end of a channel: it answers the host's resets
// and hands each new session to Accept, ending the previous one. While it
// has no session it says hello, so that a host that connects learns at
// once that the guest is there. It is a net.Listener: a ttrpc server
// serves it.
type Listener struct {
	port Port
	w    *writer
	r    *reader
	o    options
	addr Addr

	mu      sync.Mutex
	cur     *Conn
	pending *Conn // accepted by nobody yet
	ready   chan struct{}
	wake    chan struct{}
	done    chan struct{}
	closed  bool
	// afterIdle, in tests, runs once a hello is decided, before it goes.
	afterIdle func()
}

// Listen serves sessions over port until Close. The Listener owns port.
func Listen(port Port, opts ...Option) *Listener {
	o := defaults(opts)
	l := &Listener{
		port: port, w: newWriter(port), r: newReader(port), o: o,
		addr:  Addr{Side: "guest", Path: o.path},
		ready: make(chan struct{}, 1), wake: make(chan struct{}, 1), done: make(chan struct{}),
	}
	go func() {
		// The first hello goes before anything is read, so that a host
		// that is connected hears it before it can start a session.
		_ = l.w.write(typeHello, 0, l.o.hello, false, time.Time{})
		go l.demux()
		l.hellos()
	}()
	return l
}

// Accept returns the next session the host starts.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		l.mu.Lock()
		if l.closed {
			l.mu.Unlock()
			return nil, net.ErrClosed
		}
		if c := l.pending; c != nil {
			l.pending = nil
			l.mu.Unlock()
			return c, nil
		}
		l.mu.Unlock()
		select {
		case <-l.ready:
		case <-l.done:
		}
	}
}

// Close ends the current session and stops serving; the port is closed.
func (l *Listener) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	cur := l.cur
	close(l.done)
	l.mu.Unlock()
	// Closing the port first unblocks a write stuck while no host is
	// connected; the host learns of the end from its socket or the next
	// hello.
	err := l.port.Close()
	if cur != nil {
		cur.end(net.ErrClosed)
	}
	return err
}

// Addr names the guest's end.
func (l *Listener) Addr() net.Addr { return l.addr }

func (l *Listener) isClosed() bool {
	select {
	case <-l.done:
		return true
	default:
		return false
	}
}

// demux reads the host's frames: resets start sessions, data goes to the
// current one.
func (l *Listener) demux() {
	poll := l.o.pollMin
	for {
		f, err := l.r.next()
		if err != nil {
			if l.isClosed() {
				return
			}
			if errors.Is(err, io.EOF) {
				// The host side is closed: the session cannot go on, and a
				// frame it left half-sent is dropped. Poll until a host
				// connects.
				l.endCurrent(io.EOF)
				l.r.reset()
			}
			select {
			case <-l.done:
				return
			case <-time.After(poll):
			}
			poll = min(2*poll, l.o.pollMax)
			continue
		}
		poll = l.o.pollMin
		switch f.typ {
		case typeReset:
			if f.session != 0 {
				l.reset(f.session)
			}
		case typeData:
			if c := l.current(f.session); c != nil {
				c.deliver(f.payload)
			}
		case typeClose:
			if c := l.current(f.session); c != nil {
				c.end(io.EOF)
			}
		}
	}
}

// reset starts session s (or acknowledges it again: the host resends its
// reset until it hears the acknowledgement).
func (l *Listener) reset(s uint32) {
	l.mu.Lock()
	old := l.cur
	if old == nil || old.session != s || !old.live() {
		c := newConn(l.w, s, l.addr, Addr{Side: "host", Path: l.o.path})
		c.onClose = l.ended
		l.cur, l.pending = c, c
		select {
		case l.ready <- struct{}{}:
		default:
		}
	} else {
		old = nil
	}
	l.mu.Unlock()
	if old != nil {
		old.end(ErrSuperseded)
	}
	_ = l.w.write(typeResetAck, s, nil, true, time.Time{})
}

// current returns the live session s, if it is the current one.
func (l *Listener) current(s uint32) *Conn {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cur != nil && l.cur.session == s {
		return l.cur
	}
	return nil
}

func (l *Listener) endCurrent(err error) {
	l.mu.Lock()
	c := l.cur
	l.mu.Unlock()
	if c != nil {
		c.end(err)
	}
}

// ended forgets a session that is over, and says hello again.
func (l *Listener) ended(c *Conn) {
	l.mu.Lock()
	if l.cur == c {
		l.cur = nil
	}
	if l.pending == c {
		l.pending = nil
	}
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

// hellos says hello while there is no session.
func (l *Listener) hellos() {
	t := time.NewTimer(l.o.helloInterval)
	defer t.Stop()
	for {
		select {
		case <-l.done:
			return
		case <-t.C:
		case <-l.wake:
		}
		// Idle is checked with the writer held: a session that starts
		// meanwhile writes its acknowledgement after this hello, never
		// before it (a hello after the acknowledgement would tell the host
		// that the guest lost its session).
		_, _ = l.w.writeIf(l.idle, typeHello, 0, l.o.hello, false, time.Time{})
		if !t.Stop() {
			select {
			case <-t.C:
			default:
			}
		}
		t.Reset(l.o.helloInterval)
	}
}

// idle reports whether the guest has no session.
func (l *Listener) idle() bool {
	l.mu.Lock()
	idle, hook := l.cur == nil, l.afterIdle
	l.mu.Unlock()
	if idle && hook != nil {
		hook()
	}
	return idle
}
