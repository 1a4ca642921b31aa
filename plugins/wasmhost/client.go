package wasmhost

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/launch"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/unixsock"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
)

// ErrHostGone is returned by calls about a process whose host is gone (it
// exited or was killed, and the processes it ran with it), and by calls
// that found no host to answer them.
var ErrHostGone = fmt.Errorf("the wasm host is gone: %w", errdefs.ErrUnavailable)

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
// starting the host when asked to, and reconnects after the host is gone.
//
// A process belongs to the host process that created it, named by its boot
// token (ProcessState.Boot): calls about it carry that boot, and once the
// client has seen that host go (its connection broke and no host, or
// another one, answers) they fail with ErrHostGone at once, without
// dialling. Waits learn it the moment the connection breaks.
type Client struct {
	launch Launch
	dialMu sync.Mutex // one dial or start at a time

	mu    sync.Mutex
	conn  *hostConn
	hello *api.HelloResponse // of the host reached last
	gone  map[string]bool    // boots of hosts known to be gone
}

// hostConn is one connection to one host process.
type hostConn struct {
	tc    *ttrpc.Client
	api   api.WasmHostService
	hello *api.HelloResponse
}

// NewClient returns a client of the host described by l.
func NewClient(l Launch) *Client {
	return &Client{launch: l, gone: map[string]bool{}}
}

// dialTimeout bounds reaching a host that should be there.
const dialTimeout = 2 * time.Second

// dial connects to the host serving socket and greets it.
func (c *Client) dial(ctx context.Context) (*hostConn, error) {
	ctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	cn := &hostConn{}
	tc, err := unixsock.Dial(ctx, c.launch.Socket, func() { c.drop(cn) })
	if err != nil {
		return nil, err
	}
	cn.tc, cn.api = tc, api.NewWasmHostClient(tc)
	h, err := cn.api.Hello(ctx, &api.HelloRequest{Version: ProtocolVersion})
	if err = unixsock.Native(err); err != nil {
		tc.Close()
		return nil, fmt.Errorf("wasm host hello: %w", err)
	}
	if h.GetVersion() != ProtocolVersion {
		tc.Close()
		return nil, fmt.Errorf("wasm host at %s speaks protocol %d, want %d: %w", c.launch.Socket, h.GetVersion(), ProtocolVersion, errdefs.ErrFailedPrecondition)
	}
	cn.hello = h
	return cn, nil
}

// current returns the live connection, if any.
func (c *Client) current() *hostConn {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.conn
}

// connect returns a connection to the host, dialling (and with start,
// starting a host) when there is none.
func (c *Client) connect(ctx context.Context, start bool) (*hostConn, error) {
	if cn := c.current(); cn != nil {
		return cn, nil
	}
	c.dialMu.Lock()
	defer c.dialMu.Unlock()
	if cn := c.current(); cn != nil {
		return cn, nil
	}
	cn, err := c.dial(ctx)
	if err != nil && start {
		bin := c.launch.Binary
		if bin == "" && c.launch.Find != nil {
			var ferr error
			if bin, ferr = c.launch.Find(); ferr != nil {
				return nil, fmt.Errorf("%w: %w", ferr, errdefs.ErrFailedPrecondition)
			}
		}
		if bin == "" {
			return nil, fmt.Errorf("no kuasar-wasm-host binary: install it beside containerd-kuasar or set host_path: %w", errdefs.ErrFailedPrecondition)
		}
		err = launch.Detached(ctx, launch.Spec{
			Binary:  bin,
			Args:    append([]string{"--socket", c.launch.Socket}, c.launch.Args...),
			LogPath: c.launch.LogPath,
		}, func(ctx context.Context) error {
			var derr error
			cn, derr = c.dial(ctx)
			return derr
		})
		if err != nil {
			return nil, fmt.Errorf("starting the wasm host: %w", err)
		}
	}
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.hello != nil && c.hello.GetBoot() != cn.hello.GetBoot() {
		// One host serves the socket at a time: the one before is gone.
		c.gone[c.hello.GetBoot()] = true
	}
	c.conn, c.hello = cn, cn.hello
	return cn, nil
}

// drop forgets a broken connection.
func (c *Client) drop(cn *hostConn) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == cn {
		c.conn = nil
	}
	if cn.tc != nil {
		cn.tc.Close()
	}
}

func (c *Client) markGone(boot string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gone[boot] = true
}

func (c *Client) isGone(boot string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gone[boot]
}

// Connect returns the identity of a live host, starting one if none
// answers.
func (c *Client) Connect(ctx context.Context) (*api.HelloResponse, error) {
	cn, err := c.connect(ctx, true)
	if err != nil {
		return nil, err
	}
	return cn.hello, nil
}

// Boot returns the identity of the host reached last ("" if none yet).
func (c *Client) Boot() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hello.GetBoot()
}

// Gone reports whether the host process boot is known to be gone.
func (c *Client) Gone(boot string) bool {
	return boot != "" && c.isGone(boot)
}

// Close closes the connection; the host keeps running.
func (c *Client) Close() error {
	if cn := c.current(); cn != nil {
		c.drop(cn)
	}
	return nil
}

// noHost reports whether a dial found no host serving the socket.
func noHost(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, os.ErrNotExist) ||
		errors.Is(err, ttrpc.ErrClosed) || errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}

// broken reports whether a call failed because its connection broke (the
// host may or may not have got it), or because the host cancelled it as it
// stopped serving (ctx is the call's own: not cancelled).
func broken(ctx context.Context, err error) bool {
	return errors.Is(err, ttrpc.ErrClosed) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) ||
		(errors.Is(err, context.Canceled) && ctx.Err() == nil)
}

func goneErr(boot string) error {
	return fmt.Errorf("wasm host %s: %w", boot, ErrHostGone)
}

// call runs fn on the host. With boot set, the call is about a process of
// that host process, and fails with ErrHostGone when it is gone. With
// start, a host is started when none answers.
func (c *Client) call(ctx context.Context, boot string, start bool, fn func(context.Context, api.WasmHostService) error) error {
	for attempt := 0; ; attempt++ {
		if boot != "" && c.isGone(boot) {
			return goneErr(boot)
		}
		cn, err := c.connect(ctx, start)
		switch {
		case err != nil && start:
			return err
		case err != nil && noHost(err):
			if boot != "" {
				c.markGone(boot)
			}
			return fmt.Errorf("%w: %w", ErrHostGone, err)
		case err != nil:
			return fmt.Errorf("reaching the wasm host: %w: %w", err, errdefs.ErrUnavailable)
		}
		if boot != "" && cn.hello.GetBoot() != boot {
			c.markGone(boot)
			return goneErr(boot)
		}
		err = unixsock.Native(fn(ctx, cn.api))
		if !broken(ctx, err) {
			return err
		}
		// The connection broke: the host is gone, or it is not and the
		// call is made again on a new connection (once). Which one it is,
		// the next connect says.
		c.drop(cn)
		if attempt > 0 || ctx.Err() != nil {
			return fmt.Errorf("%w: %w", ErrHostGone, err)
		}
	}
}

// Create creates a container, starting the host if needed. A host that
// is on its way out for idleness refuses it: the call is made again once a
// new host has taken over.
func (c *Client) Create(ctx context.Context, req *api.CreateRequest) (*api.ProcessState, error) {
	var st *api.ProcessState
	for delay := retryDelay; ; delay *= 2 {
		err := c.call(ctx, "", true, func(ctx context.Context, h api.WasmHostService) (err error) {
			st, err = h.Create(ctx, req)
			return err
		})
		if !errdefs.IsUnavailable(err) || delay > 3*time.Second {
			return st, err
		}
		c.Close()
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(delay):
		}
	}
}

// retryDelay paces the first retry of a create refused by an exiting host.
const retryDelay = 100 * time.Millisecond

// Exec prepares an exec in a container of the host req.Boot names.
func (c *Client) Exec(ctx context.Context, req *api.ExecRequest) (st *api.ProcessState, err error) {
	err = c.call(ctx, req.GetBoot(), false, func(ctx context.Context, h api.WasmHostService) (err error) {
		st, err = h.Exec(ctx, req)
		return err
	})
	return st, err
}

// Start starts a process.
func (c *Client) Start(ctx context.Context, r *api.ProcessRef) (st *api.ProcessState, err error) {
	err = c.call(ctx, r.GetBoot(), false, func(ctx context.Context, h api.WasmHostService) (err error) {
		st, err = h.Start(ctx, r)
		return err
	})
	return st, err
}

// Wait waits for a process to exit. It fails with ErrHostGone as soon as
// the connection to the process's host breaks and that host is gone.
func (c *Client) Wait(ctx context.Context, r *api.ProcessRef) (e *api.Exit, err error) {
	err = c.call(ctx, r.GetBoot(), false, func(ctx context.Context, h api.WasmHostService) (err error) {
		e, err = h.Wait(ctx, r)
		return err
	})
	return e, err
}

// State reports a process.
func (c *Client) State(ctx context.Context, r *api.ProcessRef) (st *api.ProcessState, err error) {
	err = c.call(ctx, r.GetBoot(), false, func(ctx context.Context, h api.WasmHostService) (err error) {
		st, err = h.State(ctx, r)
		return err
	})
	return st, err
}

// Kill signals a process (with all, a container's execs too).
func (c *Client) Kill(ctx context.Context, r *api.ProcessRef, sig int, all bool) error {
	return c.call(ctx, r.GetBoot(), false, func(ctx context.Context, h api.WasmHostService) error {
		_, err := h.Kill(ctx, &api.KillRequest{Ref: r, Signal: int32(sig), All: all})
		return err
	})
}

// Delete releases a stopped process.
func (c *Client) Delete(ctx context.Context, r *api.ProcessRef) (st *api.ProcessState, err error) {
	err = c.call(ctx, r.GetBoot(), false, func(ctx context.Context, h api.WasmHostService) (err error) {
		st, err = h.Delete(ctx, r)
		return err
	})
	return st, err
}

// CloseStdin closes a process's stdin.
func (c *Client) CloseStdin(ctx context.Context, r *api.ProcessRef) error {
	return c.call(ctx, r.GetBoot(), false, func(ctx context.Context, h api.WasmHostService) error {
		_, err := h.CloseStdin(ctx, r)
		return err
	})
}

// Update changes a container's limits.
func (c *Client) Update(ctx context.Context, r *api.ProcessRef, l *api.Limits) error {
	return c.call(ctx, r.GetBoot(), false, func(ctx context.Context, h api.WasmHostService) error {
		_, err := h.Update(ctx, &api.UpdateRequest{Ref: r, Limits: l})
		return err
	})
}

// Stats reports a container's usage.
func (c *Client) Stats(ctx context.Context, r *api.ProcessRef) (s *api.ContainerStats, err error) {
	err = c.call(ctx, r.GetBoot(), false, func(ctx context.Context, h api.WasmHostService) (err error) {
		s, err = h.Stats(ctx, r)
		return err
	})
	return s, err
}

// List reports the processes of a pod ("" for all).
func (c *Client) List(ctx context.Context, pod string) (out []*api.ProcessState, err error) {
	err = c.call(ctx, "", false, func(ctx context.Context, h api.WasmHostService) error {
		r, err := h.List(ctx, &api.PodRef{Pod: pod})
		out = r.GetProcesses()
		return err
	})
	return out, err
}

// ReleasePod deletes whatever is left of a pod in the host. A host that
// is not running holds nothing: that is not an error, and when the host
// reached last is known to be gone (and no other was reached since),
// nothing is dialled.
func (c *Client) ReleasePod(ctx context.Context, pod string) error {
	c.mu.Lock()
	noHost := c.conn == nil && c.hello != nil && c.gone[c.hello.GetBoot()]
	c.mu.Unlock()
	if noHost {
		return nil
	}
	err := c.call(ctx, "", false, func(ctx context.Context, h api.WasmHostService) error {
		_, err := h.ReleasePod(ctx, &api.PodRef{Pod: pod})
		return err
	})
	if errors.Is(err, ErrHostGone) {
		return nil
	}
	return err
}

// HostStats reports node-wide figures of the host.
func (c *Client) HostStats(ctx context.Context) (s *api.HostStatsResponse, err error) {
	err = c.call(ctx, "", false, func(ctx context.Context, h api.WasmHostService) (err error) {
		s, err = h.HostStats(ctx, &emptypb.Empty{})
		return err
	})
	return s, err
}
