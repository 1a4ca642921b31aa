// Package monitor is containerd-kuasar's side of the process keeper (see
// package keeper): an internal plugin, shared by the sandbox controllers,
// that starts processes through the keeper and reports each exit to whoever
// watches that process. It connects lazily, starts the keeper when it is
// gone, and after a daemon restart collects the exits the keeper kept
// meanwhile.
//
// Every process is named by pid and start time (keeper.ProcessRef), so an
// exit is never reported for a later process that got the same pid.
package monitor

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/launch"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/unixsock"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
)

// LostStatus is reported for a process whose exit status is unknown because
// the keeper that reaped it is gone.
const LostStatus = keeper.LostStatus

// callTimeout bounds the keeper calls that should answer at once.
const callTimeout = 30 * time.Second

// retryBackoff is how long a watcher waits before reconnecting to a keeper
// that went away.
const retryBackoff = 200 * time.Millisecond

// Monitor spawns processes through the keeper and reports their exits.
type Monitor struct {
	launch keeper.Launch

	mu       sync.Mutex
	client   *keeper.Client
	boot     string
	watchers map[keeper.ProcessRef]*watcher
	closed   bool
}

type watcher struct {
	cancel context.CancelFunc
}

// New returns a Monitor for the keeper described by l.
func New(l keeper.Launch) *Monitor {
	return &Monitor{
		launch:   l,
		watchers: map[keeper.ProcessRef]*watcher{},
	}
}

// FindKeeper resolves the keeper binary: an explicit path, else one beside
// the running executable, else one on PATH.
func FindKeeper(configured string) (string, error) {
	return launch.Find(configured, "kuasar-keeper")
}

// conn returns a live keeper connection, starting the keeper if needed.
func (m *Monitor) conn(ctx context.Context) (*keeper.Client, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, fmt.Errorf("monitor closed: %w", errdefs.ErrUnavailable)
	}
	if m.client != nil {
		select {
		case <-m.client.Done():
			m.client = nil
		default:
			return m.client, nil
		}
	}
	if m.launch.Binary == "" {
		return nil, fmt.Errorf("no kuasar-keeper binary: install it beside containerd-kuasar or set keeper_path: %w", errdefs.ErrFailedPrecondition)
	}
	c, err := keeper.Connect(ctx, m.launch)
	if err != nil {
		return nil, fmt.Errorf("connecting to the process keeper: %w", err)
	}
	if m.boot != "" && m.boot != c.Boot {
		// The processes the previous keeper parented are orphans of init
		// now: their statuses will not reach us.
		log.G(ctx).WithField("keeper", c.KeeperPid).Error("process keeper was replaced; exit statuses of running workloads will be reported as 255")
	}
	m.client, m.boot = c, c.Boot
	log.G(ctx).WithField("keeper", c.KeeperPid).Debug("connected to process keeper")
	return c, nil
}

// Connect makes sure the keeper runs.
func (m *Monitor) Connect(ctx context.Context) error {
	_, err := m.conn(ctx)
	return err
}

// Watch calls fn once, from a goroutine of its own, when the process ref
// exits, then acknowledges the exit to the keeper (fn must have recorded
// what it needs by then). A process the keeper does not know (gone with no
// exit kept) is reported with LostStatus.
func (m *Monitor) Watch(ctx context.Context, ref keeper.ProcessRef, fn func(keeper.Exit)) {
	wctx := m.register(ref)
	go m.watch(wctx, ref, fn)
}

// Rewatch is Watch for a process recorded before a restart: an exit the
// keeper kept meanwhile is delivered before Rewatch returns, so that the
// process is known to have exited before anyone asks about it.
func (m *Monitor) Rewatch(ctx context.Context, ref keeper.ProcessRef, fn func(keeper.Exit)) error {
	c, err := m.conn(ctx)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	e, err := c.Wait(cctx, ref, true)
	switch {
	case errdefs.IsNotFound(err):
		m.deliver(ref, keeper.Exit{Process: ref, Status: LostStatus, At: time.Now(), Lost: true}, fn)
		return nil
	case err != nil:
		return fmt.Errorf("asking the keeper for %s: %w", ref, err)
	case e != nil:
		m.deliver(ref, *e, fn)
		return nil
	}
	m.Watch(ctx, ref, fn)
	return nil
}

func (m *Monitor) register(ref keeper.ProcessRef) context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	m.mu.Lock()
	if old, ok := m.watchers[ref]; ok {
		old.cancel()
	}
	m.watchers[ref] = &watcher{cancel: cancel}
	m.mu.Unlock()
	return ctx
}

func (m *Monitor) watch(ctx context.Context, ref keeper.ProcessRef, fn func(keeper.Exit)) {
	for {
		c, err := m.conn(ctx)
		if err == nil {
			var e *keeper.Exit
			e, err = c.Wait(ctx, ref, false)
			switch {
			case err == nil && e != nil:
				m.deliver(ref, *e, fn)
				return
			case errdefs.IsNotFound(err):
				log.G(ctx).WithField("process", ref).Warn("process ended with no exit status kept")
				m.deliver(ref, keeper.Exit{Process: ref, Status: LostStatus, At: time.Now(), Lost: true}, fn)
				return
			}
		}
		if ctx.Err() != nil {
			return // unwatched, or the monitor closed
		}
		if err != nil && !unixsock.IsClosed(err) && !errors.Is(err, context.DeadlineExceeded) {
			log.G(ctx).WithError(err).WithField("process", ref).Warn("waiting for a process through the keeper")
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(retryBackoff):
		}
	}
}

// deliver reports an exit once and acknowledges it.
func (m *Monitor) deliver(ref keeper.ProcessRef, e keeper.Exit, fn func(keeper.Exit)) {
	m.mu.Lock()
	if w, ok := m.watchers[ref]; ok {
		w.cancel()
		delete(m.watchers, ref)
	}
	m.mu.Unlock()
	fn(e)
	m.ack(ref)
}

func (m *Monitor) ack(ref keeper.ProcessRef) {
	m.mu.Lock()
	c := m.client
	m.mu.Unlock()
	if c == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if err := c.Ack(ctx, ref); err != nil && !unixsock.IsClosed(err) {
		log.G(ctx).WithError(err).WithField("process", ref).Debug("acknowledging exit")
	}
}

// Unwatch stops watching ref; nobody will ask for its exit, so the keeper
// drops it when it comes.
func (m *Monitor) Unwatch(ref keeper.ProcessRef) {
	if ref.Pid == 0 {
		return
	}
	m.mu.Lock()
	w, ok := m.watchers[ref]
	delete(m.watchers, ref)
	m.mu.Unlock()
	if ok {
		w.cancel()
	}
	m.ack(ref)
}

// Spawn starts a process as a child of the keeper (see api.SpawnRequest).
// A command spawned with Wait is bounded by ctx's deadline, or by
// callTimeout when ctx has none; the keeper kills it when that passes.
func (m *Monitor) Spawn(ctx context.Context, req *api.SpawnRequest) (keeper.SpawnResult, error) {
	c, err := m.conn(ctx)
	if err != nil {
		return keeper.SpawnResult{}, err
	}
	if _, ok := ctx.Deadline(); !ok && req.GetWait() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
	}
	return c.Spawn(ctx, req)
}

// withClient runs a short call on the keeper connection.
func (m *Monitor) withClient(ctx context.Context, call func(context.Context, *keeper.Client) error) error {
	c, err := m.conn(ctx)
	if err != nil {
		return err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, callTimeout)
		defer cancel()
	}
	return call(ctx, c)
}

// ResizePty resizes the terminal the keeper holds under key.
func (m *Monitor) ResizePty(ctx context.Context, key string, w, h uint32) error {
	return m.withClient(ctx, func(ctx context.Context, c *keeper.Client) error { return c.ResizePty(ctx, key, w, h) })
}

// CloseStdin closes the stdin the keeper holds under key.
func (m *Monitor) CloseStdin(ctx context.Context, key string) error {
	return m.withClient(ctx, func(ctx context.Context, c *keeper.Client) error { return c.CloseStdin(ctx, key) })
}

// ReleaseIO drops the streams held under key (every key with that prefix,
// with prefix).
func (m *Monitor) ReleaseIO(ctx context.Context, key string, prefix bool) error {
	return m.withClient(ctx, func(ctx context.Context, c *keeper.Client) error { return c.ReleaseIO(ctx, key, prefix) })
}

// ListIO lists the keys of the streams the keeper holds.
func (m *Monitor) ListIO(ctx context.Context) (keys []string, err error) {
	err = m.withClient(ctx, func(ctx context.Context, c *keeper.Client) error {
		keys, err = c.ListIO(ctx)
		return err
	})
	return keys, err
}

// Close stops every watcher and drops the keeper connection; the keeper
// and its children live on.
func (m *Monitor) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	for ref, w := range m.watchers {
		w.cancel()
		delete(m.watchers, ref)
	}
	if m.client != nil {
		return m.client.Close()
	}
	return nil
}

// KeeperBinary is the kuasar-keeper executable ("" if none was found).
func (m *Monitor) KeeperBinary() string { return m.launch.Binary }
