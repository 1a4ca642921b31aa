package wasmhost

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/rpc"
	"net/rpc/jsonrpc"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/launch"
)

// ErrHostGone is returned by calls whose connection to the host broke: the
// host exited or was killed, and the processes it ran with it.
var ErrHostGone = fmt.Errorf("the wasm host is gone: %w", errdefs.ErrUnavailable)

// errNotSent is a call that never left: the connection had broken before.
var errNotSent = fmt.Errorf("connection closed before the call: %w", ErrHostGone)

// Launch says how to reach the host, and how to start it when none
// answers.
type Launch struct {
	Binary string // kuasar-wasm-host executable
	// Find resolves the executable when Binary is empty, at each start, so
	// that installing it needs no daemon restart.
	Find    func() (string, error)
	Socket  string   // socket it serves
	LogPath string   // its log file
	Args    []string // extra arguments
}

// Client is the daemon's connection to the host. It connects lazily,
// starting the host when needed, and reconnects after the host is gone.
type Client struct {
	launch Launch

	mu    sync.Mutex
	rc    *rpc.Client
	hello HelloReply
}

// NewClient returns a client of the host described by l.
func NewClient(l Launch) *Client {
	return &Client{launch: l}
}

func dial(ctx context.Context, socket string) (*rpc.Client, HelloReply, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, HelloReply{}, err
	}
	rc := rpc.NewClientWithCodec(jsonrpc.NewClientCodec(nc))
	var h HelloReply
	if err := callOn(ctx, rc, "Hello", &Empty{}, &h); err != nil {
		rc.Close()
		return nil, HelloReply{}, fmt.Errorf("wasm host hello: %w", err)
	}
	if h.Version != ProtocolVersion {
		rc.Close()
		return nil, HelloReply{}, fmt.Errorf("wasm host at %s speaks protocol %d, want %d", socket, h.Version, ProtocolVersion)
	}
	return rc, h, nil
}

// Connect returns the identity of a live host, starting one if none
// answers.
func (c *Client) Connect(ctx context.Context) (HelloReply, error) {
	_, h, err := c.conn(ctx, true)
	return h, err
}

// Boot returns the identity of the host reached last ("" if none yet).
func (c *Client) Boot() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hello.Boot
}

func (c *Client) conn(ctx context.Context, start bool) (*rpc.Client, HelloReply, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rc != nil {
		return c.rc, c.hello, nil
	}
	rc, h, err := dial(ctx, c.launch.Socket)
	if err != nil && start {
		bin := c.launch.Binary
		if bin == "" && c.launch.Find != nil {
			var ferr error
			if bin, ferr = c.launch.Find(); ferr != nil {
				return nil, HelloReply{}, fmt.Errorf("%w: %w", ferr, errdefs.ErrFailedPrecondition)
			}
		}
		if bin == "" {
			return nil, HelloReply{}, fmt.Errorf("no kuasar-wasm-host binary: install it beside containerd-kuasar or set host_path: %w", errdefs.ErrFailedPrecondition)
		}
		err = launch.Detached(ctx, launch.Spec{
			Binary:  bin,
			Args:    append([]string{"--socket", c.launch.Socket}, c.launch.Args...),
			LogPath: c.launch.LogPath,
		}, func(ctx context.Context) error {
			var derr error
			rc, h, derr = dial(ctx, c.launch.Socket)
			return derr
		})
		if err != nil {
			return nil, HelloReply{}, fmt.Errorf("starting the wasm host: %w", err)
		}
	}
	if err != nil {
		return nil, HelloReply{}, err
	}
	c.rc, c.hello = rc, h
	return rc, h, nil
}

// drop forgets a broken connection.
func (c *Client) drop(rc *rpc.Client) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rc == rc {
		c.rc.Close()
		c.rc = nil
	}
}

// Close closes the connection; the host keeps running.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.rc != nil {
		c.rc.Close()
		c.rc = nil
	}
	return nil
}

func callOn(ctx context.Context, rc *rpc.Client, method string, args, reply any) error {
	call := rc.Go(serviceName+"."+method, args, reply, make(chan *rpc.Call, 1))
	select {
	case <-call.Done:
	case <-ctx.Done():
		return ctx.Err()
	}
	var se rpc.ServerError
	switch err := call.Error; {
	case err == nil:
		return nil
	case errors.As(err, &se):
		return decodeError(string(se))
	case errors.Is(err, rpc.ErrShutdown), errors.Is(err, syscall.EPIPE), errors.Is(err, net.ErrClosed):
		// The connection was gone before the call could be written.
		return errNotSent
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return ErrHostGone
	default:
		return err
	}
}

// call runs method on the host, starting the host if start is set. It
// fails with ErrHostGone when the host went away during the call.
func (c *Client) call(ctx context.Context, start bool, method string, args, reply any) error {
	rc, _, err := c.conn(ctx, start)
	if err != nil {
		if !start {
			return fmt.Errorf("%w: %w", ErrHostGone, err)
		}
		return err
	}
	err = callOn(ctx, rc, method, args, reply)
	if errors.Is(err, ErrHostGone) {
		c.drop(rc)
	}
	if errors.Is(err, errNotSent) {
		// A connection to a host that has exited since (idle, or killed):
		// the call never reached it, so it can be made again.
		if rc, _, err = c.conn(ctx, start); err != nil {
			if !start {
				return fmt.Errorf("%w: %w", ErrHostGone, err)
			}
			return err
		}
		if err = callOn(ctx, rc, method, args, reply); errors.Is(err, ErrHostGone) {
			c.drop(rc)
		}
	}
	return err
}

// Create creates a container, starting the host if needed. A host that
// is on its way out for idleness refuses it: the call is made again once a
// new host has taken over.
func (c *Client) Create(ctx context.Context, req *CreateRequest) (State, error) {
	var st State
	var err error
	for delay := retryDelay; ; delay *= 2 {
		err = c.call(ctx, true, "Create", req, &st)
		if !errdefs.IsUnavailable(err) || delay > 3*time.Second {
			return st, err
		}
		c.Close()
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-time.After(delay):
		}
	}
}

// Exec prepares an exec.
func (c *Client) Exec(ctx context.Context, req *ExecRequest) (State, error) {
	var st State
	err := c.call(ctx, false, "Exec", req, &st)
	return st, err
}

// Start starts a process.
func (c *Client) Start(ctx context.Context, r Ref) (State, error) {
	var st State
	err := c.call(ctx, false, "Start", &r, &st)
	return st, err
}

// Wait waits for a process to exit.
func (c *Client) Wait(ctx context.Context, r Ref) (Exit, error) {
	var e Exit
	err := c.call(ctx, false, "Wait", &r, &e)
	return e, err
}

// State reports a process.
func (c *Client) State(ctx context.Context, r Ref) (State, error) {
	var st State
	err := c.call(ctx, false, "State", &r, &st)
	return st, err
}

// Kill signals a process (with all, a container's execs too).
func (c *Client) Kill(ctx context.Context, r Ref, sig int, all bool) error {
	return c.call(ctx, false, "Kill", &KillRequest{Ref: r, Signal: sig, All: all}, &Empty{})
}

// Delete releases a stopped process.
func (c *Client) Delete(ctx context.Context, r Ref) (State, error) {
	var st State
	err := c.call(ctx, false, "Delete", &r, &st)
	return st, err
}

// CloseStdin closes a process's stdin.
func (c *Client) CloseStdin(ctx context.Context, r Ref) error {
	return c.call(ctx, false, "CloseStdin", &r, &Empty{})
}

// Update changes a container's limits.
func (c *Client) Update(ctx context.Context, id string, l Limits) error {
	return c.call(ctx, false, "Update", &UpdateRequest{ID: id, Limits: l}, &Empty{})
}

// Stats reports a container's usage.
func (c *Client) Stats(ctx context.Context, id string) (Stats, error) {
	var s Stats
	err := c.call(ctx, false, "Stats", &Ref{ID: id}, &s)
	return s, err
}

// List reports the processes of a pod ("" for all).
func (c *Client) List(ctx context.Context, pod string) ([]State, error) {
	var out []State
	err := c.call(ctx, false, "List", &PodRequest{Pod: pod}, &out)
	return out, err
}

// ReleasePod deletes whatever is left of a pod in the host. A host that
// is not running holds nothing: that is not an error.
func (c *Client) ReleasePod(ctx context.Context, pod string) error {
	err := c.call(ctx, false, "ReleasePod", &PodRequest{Pod: pod}, &Empty{})
	if errors.Is(err, ErrHostGone) {
		return nil
	}
	return err
}

// HostStats reports node-wide figures of the host.
func (c *Client) HostStats(ctx context.Context) (HostStats, error) {
	var s HostStats
	err := c.call(ctx, false, "HostStats", &Empty{}, &s)
	return s, err
}

// retryDelay paces reconnection attempts.
const retryDelay = 100 * time.Millisecond
