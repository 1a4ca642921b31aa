package vmm

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/unixsock"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
)

// guestConn is the daemon's connection to a VM's agent: one channel session
// at a time (the VM's socket serves one client), made again whenever it
// ends (the agent restarted, the link broke, the daemon restarted), for as
// long as the VM runs. Every call of the pod goes over it.
type guestConn struct {
	vm hypervisor.VM

	// dialMu makes one dial at a time; mu is never held across one.
	dialMu sync.Mutex
	mu     sync.Mutex
	cur    *session
	closed bool
}

// session is one ttrpc client over one channel session.
type session struct {
	client *ttrpc.Client
	agent  agentapi.AgentClient
	tasks  taskAPI.TTRPCTaskService
	done   chan struct{}
	hello  *agentapi.HelloResponse
}

func newGuestConn(vm hypervisor.VM) *guestConn {
	return &guestConn{vm: vm}
}

// errVMGone is returned for a call to a VM that has exited.
var errVMGone = fmt.Errorf("the pod's VM has exited: %w", errdefs.ErrUnavailable)

func (g *guestConn) current() (*session, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, fmt.Errorf("connection to the VM closed: %w", errdefs.ErrUnavailable)
	}
	if g.cur != nil {
		select {
		case <-g.cur.done:
			g.cur = nil
		default:
			return g.cur, nil
		}
	}
	return nil, nil
}

// session returns a live session, dialling the agent when there is none;
// it waits for the agent until ctx is done.
func (g *guestConn) session(ctx context.Context) (*session, error) {
	if s, err := g.current(); s != nil || err != nil {
		return s, err
	}
	g.dialMu.Lock()
	defer g.dialMu.Unlock()
	if s, err := g.current(); s != nil || err != nil {
		return s, err
	}
	select {
	case <-g.vm.Exited():
		return nil, errVMGone
	default:
	}
	conn, err := g.vm.DialAgent(ctx)
	if err != nil {
		select {
		case <-g.vm.Exited():
			return nil, errVMGone
		default:
		}
		return nil, fmt.Errorf("reaching the VM's agent: %w: %w", err, errdefs.ErrUnavailable)
	}
	s := &session{done: make(chan struct{})}
	var once sync.Once
	s.client = unixsock.NewClient(conn, func() { once.Do(func() { close(s.done) }) })
	s.agent = agentapi.NewAgentClient(s.client)
	s.tasks = taskAPI.NewTTRPCTaskClient(s.client)
	h, err := s.agent.Hello(ctx, &agentapi.HelloRequest{Version: agentapi.ProtocolVersion})
	if err = unixsock.Native(err); err != nil {
		s.client.Close()
		return nil, fmt.Errorf("the VM's agent: hello: %w", err)
	}
	if h.GetVersion() != agentapi.ProtocolVersion {
		s.client.Close()
		return nil, fmt.Errorf("the VM's agent speaks protocol %d, this daemon %d (a guest image of another release?): %w",
			h.GetVersion(), agentapi.ProtocolVersion, errdefs.ErrFailedPrecondition)
	}
	s.hello = h
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		s.client.Close()
		return nil, fmt.Errorf("connection to the VM closed: %w", errdefs.ErrUnavailable)
	}
	g.cur = s
	log.G(ctx).WithField("vm", g.vm.State().ID).WithField("boot", h.GetBootId()).Debug("agent session started")
	return s, nil
}

// retryable reports whether a call failed because its session ended; the
// call may be made again on a new session when it is idempotent.
func retryable(err error) bool {
	return errors.Is(err, ttrpc.ErrClosed) || errors.Is(err, errSessionEnded)
}

var errSessionEnded = errors.New("agent session ended")

// call runs fn on a session. An idempotent call whose session ends is made
// again on the next one, until ctx is done or the VM is gone.
func (g *guestConn) call(ctx context.Context, idempotent bool, fn func(context.Context, *session) error) error {
	for {
		s, err := g.session(ctx)
		if err != nil {
			return err
		}
		err = unixsock.Native(fn(ctx, s))
		if !retryable(err) {
			return err
		}
		g.drop(s)
		if !idempotent {
			return fmt.Errorf("the connection to the VM's agent broke during the call: %w: %w", err, errdefs.ErrUnavailable)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-g.vm.Exited():
			return errVMGone
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// drop forgets a session that ended.
func (g *guestConn) drop(s *session) {
	g.mu.Lock()
	if g.cur == s {
		g.cur = nil
	}
	g.mu.Unlock()
	s.client.Close()
}

// close ends the connection for good (the VM stopped, or the daemon
// stops).
func (g *guestConn) close() {
	g.mu.Lock()
	s := g.cur
	g.cur, g.closed = nil, true
	g.mu.Unlock()
	if s != nil {
		s.client.Close()
	}
}
