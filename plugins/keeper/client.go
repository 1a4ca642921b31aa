package keeper

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/launch"
)

// Client is the daemon's connection to the keeper.
type Client struct {
	c      conn
	sendMu sync.Mutex

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan reply
	onExit  func(Exit)
	err     error // set once the connection is gone
	done    chan struct{}

	// KeeperPid is the pid of the keeper process answering.
	KeeperPid int
}

type reply struct {
	m     *message
	files []*os.File
}

// ErrClosed is returned by calls on a client whose keeper connection is gone.
var ErrClosed = errors.New("keeper connection closed")

// Dial connects to a running keeper.
func Dial(ctx context.Context, socket string) (*Client, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unixpacket", socket)
	if err != nil {
		return nil, err
	}
	c := &Client{
		c:       newConn(nc.(*net.UnixConn)),
		pending: map[uint64]chan reply{},
		done:    make(chan struct{}),
	}
	go c.readLoop()
	r, err := c.call(ctx, &message{Op: opHello, Version: ProtocolVersion})
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("keeper hello: %w", err)
	}
	if r.m.Version != ProtocolVersion {
		c.Close()
		return nil, fmt.Errorf("keeper at %s speaks protocol %d, want %d", socket, r.m.Version, ProtocolVersion)
	}
	c.KeeperPid = r.m.Pid
	return c, nil
}

// Launch describes how to start a keeper when none answers.
type Launch struct {
	Binary  string   // path of the kuasar-keeper executable
	Socket  string   // socket path it listens on
	LogPath string   // file its output goes to
	Args    []string // extra arguments
}

// Connect dials the keeper at l.Socket, starting one from l.Binary when
// none answers. A started keeper is detached (own session) so it outlives
// the caller.
func Connect(ctx context.Context, l Launch) (*Client, error) {
	if c, err := Dial(ctx, l.Socket); err == nil {
		return c, nil
	}
	var c *Client
	err := launch.Detached(ctx, launch.Spec{
		Binary:  l.Binary,
		Args:    append([]string{"--socket", l.Socket}, l.Args...),
		LogPath: l.LogPath,
	}, func(ctx context.Context) error {
		var err error
		c, err = Dial(ctx, l.Socket)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("starting the keeper: %w", err)
	}
	return c, nil
}

func (c *Client) readLoop() {
	var err error
	for {
		var m *message
		var files []*os.File
		m, files, err = c.c.recv()
		if err != nil {
			break
		}
		if m.Op == opExit {
			closeAll(files)
			c.mu.Lock()
			h := c.onExit
			c.mu.Unlock()
			if h != nil && m.Exit != nil {
				h(*m.Exit)
			}
			continue
		}
		c.mu.Lock()
		ch, ok := c.pending[m.ID]
		delete(c.pending, m.ID)
		c.mu.Unlock()
		if !ok {
			closeAll(files)
			continue
		}
		ch <- reply{m: m, files: files}
	}
	c.mu.Lock()
	c.err = fmt.Errorf("%w: %v", ErrClosed, err)
	for id, ch := range c.pending {
		close(ch)
		delete(c.pending, id)
	}
	c.mu.Unlock()
	close(c.done)
}

// Done is closed when the keeper connection is gone.
func (c *Client) Done() <-chan struct{} { return c.done }

func (c *Client) call(ctx context.Context, m *message, files ...*os.File) (reply, error) {
	ch := make(chan reply, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return reply{}, err
	}
	c.nextID++
	m.ID = c.nextID
	c.pending[m.ID] = ch
	c.mu.Unlock()

	c.sendMu.Lock()
	err := c.c.send(m, files...)
	c.sendMu.Unlock()
	if err != nil {
		c.mu.Lock()
		delete(c.pending, m.ID)
		c.mu.Unlock()
		return reply{}, fmt.Errorf("keeper send: %w", err)
	}
	select {
	case r, ok := <-ch:
		if !ok {
			c.mu.Lock()
			err := c.err
			c.mu.Unlock()
			return reply{}, err
		}
		if r.m.Error != "" {
			closeAll(r.files)
			return reply{}, errors.New(r.m.Error)
		}
		return r, nil
	case <-ctx.Done():
		c.mu.Lock()
		delete(c.pending, m.ID)
		c.mu.Unlock()
		return reply{}, ctx.Err()
	}
}

// Spawn starts a process as a child of the keeper. files are the
// descriptors SpawnRequest.Stdio and Extra index into; the caller keeps
// ownership of them. With req.Wait the returned Exit is the child's.
func (c *Client) Spawn(ctx context.Context, req SpawnRequest, files ...*os.File) (int, *Exit, error) {
	r, err := c.call(ctx, &message{Op: opSpawn, Spawn: &req}, files...)
	if err != nil {
		return 0, nil, err
	}
	return r.m.Pid, r.m.Exit, nil
}

// Subscribe returns the exits the keeper holds unacknowledged (the backlog)
// and delivers every later exit to h, from one goroutine. Exits are
// redelivered (to a new connection) until acknowledged.
func (c *Client) Subscribe(ctx context.Context, h func(Exit)) ([]Exit, error) {
	c.mu.Lock()
	c.onExit = h
	c.mu.Unlock()
	r, err := c.call(ctx, &message{Op: opSubscribe})
	if err != nil {
		return nil, err
	}
	return r.m.Exits, nil
}

// Sync returns once every exit the keeper has reaped so far has been
// delivered to this client's exit handler.
func (c *Client) Sync(ctx context.Context) error {
	_, err := c.call(ctx, &message{Op: opSync})
	return err
}

// Ack tells the keeper it may forget the exits of pids.
func (c *Client) Ack(ctx context.Context, pids ...int) error {
	if len(pids) == 0 {
		return nil
	}
	_, err := c.call(ctx, &message{Op: opAck, Pids: pids})
	return err
}

// PutFD hands the keeper a duplicate of f to hold under key.
func (c *Client) PutFD(ctx context.Context, key string, f *os.File) error {
	_, err := c.call(ctx, &message{Op: opPutFD, Key: key}, f)
	return err
}

// GetFD returns a duplicate of the descriptor held under key.
func (c *Client) GetFD(ctx context.Context, key string) (*os.File, error) {
	r, err := c.call(ctx, &message{Op: opGetFD, Key: key})
	if err != nil {
		return nil, err
	}
	if len(r.files) != 1 {
		closeAll(r.files)
		return nil, fmt.Errorf("keeper returned %d descriptors for %q", len(r.files), key)
	}
	return r.files[0], nil
}

// DropFD closes the descriptor held under key, or under every key starting
// with key when prefix is set.
func (c *Client) DropFD(ctx context.Context, key string, prefix bool) error {
	_, err := c.call(ctx, &message{Op: opDropFD, Key: key, Prefix: prefix})
	return err
}

// Close ends the connection; the keeper and its children keep running.
func (c *Client) Close() error {
	return c.c.c.Close()
}
