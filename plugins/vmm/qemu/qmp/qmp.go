// Package qmp is a client of the QEMU Machine Protocol, the JSON control
// socket through which the kuasar-vmm QEMU driver (plugins/vmm/qemu) runs
// a VM: status, quit, device hotplug (with file descriptors passed over
// the socket), and the migration commands a template and its clones use
// (migrate, migrate-incoming, migrate-set-capabilities, cont), with the
// events that say when they are done.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Error is an error QEMU returned for a command.
type Error struct {
	Command string
	Class   string `json:"class"`
	Desc    string `json:"desc"`
}

func (e *Error) Error() string { return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc) }

// ErrClosed is returned for commands on a closed connection (QEMU exited,
// or Close).
var ErrClosed = errors.New("qmp: connection closed")

// Event is an asynchronous QMP event.
type Event struct {
	Name string          `json:"event"`
	Data json.RawMessage `json:"data,omitempty"`
	Time time.Time       `json:"-"`
}

// Greeting is what QEMU says first.
type Greeting struct {
	Version struct {
		QEMU struct {
			Major int `json:"major"`
			Minor int `json:"minor"`
			Micro int `json:"micro"`
		} `json:"qemu"`
		Package string `json:"package"`
	} `json:"version"`
	Capabilities []string `json:"capabilities"`
}

// message is any object QEMU sends.
type message struct {
	QMP       *Greeting       `json:"QMP,omitempty"`
	Return    json.RawMessage `json:"return,omitempty"`
	Error     *Error          `json:"error,omitempty"`
	ID        *uint64         `json:"id,omitempty"`
	Event     string          `json:"event,omitempty"`
	Data      json.RawMessage `json:"data,omitempty"`
	Timestamp *struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp,omitempty"`
}

type reply struct {
	ret json.RawMessage
	err *Error
}

// Client is one QMP connection. Its methods are safe for concurrent use.
type Client struct {
	conn     net.Conn
	greeting Greeting

	wmu sync.Mutex // one command on the wire at a time

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan reply
	subs    map[*Subscription]bool
	err     error
	done    chan struct{}
}

// Dial connects to QEMU's QMP socket, retrying until it accepts or ctx is
// done, checks the connection with check (if not nil: who serves it) and
// negotiates capabilities.
func Dial(ctx context.Context, path string, check func(net.Conn) error) (*Client, error) {
	var d net.Dialer
	backoff := 2 * time.Millisecond
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			if check != nil {
				if err := check(conn); err != nil {
					conn.Close()
					return nil, fmt.Errorf("qmp: %s: %w", path, err)
				}
			}
			return New(ctx, conn)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("qmp: connecting to %s: %w (last error: %v)", path, ctx.Err(), err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 100*time.Millisecond)
	}
}

// New runs the QMP handshake on conn (QEMU's greeting, then
// qmp_capabilities). The Client owns conn.
func New(ctx context.Context, conn net.Conn) (*Client, error) {
	c := &Client{conn: conn, pending: map[uint64]chan reply{}, subs: map[*Subscription]bool{}, done: make(chan struct{})}
	greeted := make(chan error, 1)
	go c.read(greeted)
	select {
	case err := <-greeted:
		if err != nil {
			conn.Close()
			return nil, err
		}
	case <-ctx.Done():
		conn.Close()
		return nil, fmt.Errorf("qmp: no greeting: %w", ctx.Err())
	}
	if err := c.Execute(ctx, "qmp_capabilities", nil, nil); err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// Greeting returns QEMU's greeting (its version).
func (c *Client) Greeting() Greeting { return c.greeting }

// Done is closed when the connection is gone.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close closes the connection.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

// Execute runs a command with args (a struct or map, or nil) and decodes
// its return value into result (unless nil).
func (c *Client) Execute(ctx context.Context, cmd string, args, result any) error {
	return c.execute(ctx, cmd, args, result, -1)
}

// ExecuteWithFD is Execute, passing fd with the command (SCM_RIGHTS), as
// getfd and add-fd want.
func (c *Client) ExecuteWithFD(ctx context.Context, cmd string, args, result any, fd int) error {
	return c.execute(ctx, cmd, args, result, fd)
}

func (c *Client) execute(ctx context.Context, cmd string, args, result any, fd int) error {
	ch := make(chan reply, 1)
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return fmt.Errorf("qmp %s: %w", cmd, ErrClosed)
	}
	c.nextID++
	id := c.nextID
	c.pending[id] = ch
	c.mu.Unlock()
	forget := func() {
		c.mu.Lock()
		delete(c.pending, id)
		c.mu.Unlock()
	}

	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{cmd, args, id}
	b, err := json.Marshal(req)
	if err != nil {
		forget()
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	b = append(b, '\n')
	if err := c.write(ctx, b, fd); err != nil {
		forget()
		return fmt.Errorf("qmp %s: %w", cmd, err)
	}
	select {
	case r := <-ch:
		if r.err != nil {
			r.err.Command = cmd
			return r.err
		}
		if result != nil && len(r.ret) > 0 {
			if err := json.Unmarshal(r.ret, result); err != nil {
				return fmt.Errorf("qmp %s: decoding the reply: %w", cmd, err)
			}
		}
		return nil
	case <-c.done:
		return fmt.Errorf("qmp %s: %w", cmd, ErrClosed)
	case <-ctx.Done():
		forget()
		return fmt.Errorf("qmp %s: %w", cmd, ctx.Err())
	}
}

func (c *Client) write(ctx context.Context, b []byte, fd int) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetWriteDeadline(dl)
		defer c.conn.SetWriteDeadline(time.Time{})
	}
	if fd < 0 {
		_, err := c.conn.Write(b)
		return err
	}
	uc, ok := c.conn.(*net.UnixConn)
	if !ok {
		return errors.New("passing a file descriptor needs a Unix socket")
	}
	n, oobn, err := uc.WriteMsgUnix(b, unix.UnixRights(fd), nil)
	if err == nil && (n != len(b) || oobn == 0) {
		err = io.ErrShortWrite
	}
	return err
}

// read dispatches what QEMU sends until the connection ends.
func (c *Client) read(greeted chan<- error) {
	dec := json.NewDecoder(bufio.NewReader(c.conn))
	first := true
	var err error
	for {
		var m message
		if err = dec.Decode(&m); err != nil {
			break
		}
		switch {
		case m.QMP != nil:
			if first {
				c.greeting = *m.QMP
				first = false
				greeted <- nil
			}
		case m.Event != "":
			e := Event{Name: m.Event, Data: m.Data}
			if m.Timestamp != nil {
				e.Time = time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)
			}
			c.publish(e)
		case m.ID != nil:
			c.mu.Lock()
			ch := c.pending[*m.ID]
			delete(c.pending, *m.ID)
			c.mu.Unlock()
			if ch != nil {
				ch <- reply{ret: m.Return, err: m.Error}
			}
		}
		if first {
			err = errors.New("qmp: the first message is not a greeting")
			break
		}
	}
	if first {
		greeted <- fmt.Errorf("qmp: no greeting: %w", err)
	}
	c.mu.Lock()
	c.err = err
	for s := range c.subs {
		s.close()
	}
	c.subs = map[*Subscription]bool{}
	c.mu.Unlock()
	c.conn.Close()
	close(c.done)
}

// Subscription receives events. Subscribe before running the command
// whose event you wait for, so that it cannot be missed.
type Subscription struct {
	c     *Client
	names map[string]bool
	ch    chan Event
	once  sync.Once
}

// eventBuffer is how many events a subscriber may lag; past it, events
// are dropped for that subscriber.
const eventBuffer = 64

// Subscribe returns a subscription to the events named (all if none).
func (c *Client) Subscribe(names ...string) *Subscription {
	s := &Subscription{c: c, names: map[string]bool{}, ch: make(chan Event, eventBuffer)}
	for _, n := range names {
		s.names[n] = true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		s.close()
		return s
	}
	c.subs[s] = true
	return s
}

// Events is the subscription's channel; it is closed with the connection
// or the subscription.
func (s *Subscription) Events() <-chan Event { return s.ch }

// Close ends the subscription.
func (s *Subscription) Close() {
	s.c.mu.Lock()
	if s.c.subs[s] {
		delete(s.c.subs, s)
		s.close()
	}
	s.c.mu.Unlock()
}

func (s *Subscription) close() { s.once.Do(func() { close(s.ch) }) }

// Wait returns the first event for which match (nil: any) is true.
func (s *Subscription) Wait(ctx context.Context, match func(Event) bool) (Event, error) {
	for {
		select {
		case e, ok := <-s.ch:
			if !ok {
				return Event{}, ErrClosed
			}
			if match == nil || match(e) {
				return e, nil
			}
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

func (c *Client) publish(e Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for s := range c.subs {
		if len(s.names) > 0 && !s.names[e.Name] {
			continue
		}
		select {
		case s.ch <- e:
		default: // a subscriber that does not read loses events
		}
	}
}
