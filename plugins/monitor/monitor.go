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

// connectTimeout bounds reaching (or starting) the keeper.
const connectTimeout = 15 * time.Second

// Monitor spawns processes through the keeper and reports their exits.
type Monitor struct {
	launch keeper.Launch
	// find resolves the keeper binary when launch names none, at each
	// start of a keeper, so that installing it needs no daemon restart.
	find func() (string, error)

	// dialMu makes one connect at a time; mu is never held across one.
	dialMu sync.Mutex

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

// current returns the live connection, if there is one.
func (m *Monitor) current() (*keeper.Client, error) {
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
	return nil, nil
}

// conn returns a live keeper connection, starting the keeper if needed.
func (m *Monitor) conn(ctx context.Context) (*keeper.Client, error) {
	if c, err := m.current(); c != nil || err != nil {
		return c, err
	}
	m.dialMu.Lock()
	defer m.dialMu.Unlock()
	if c, err := m.current(); c != nil || err != nil {
		return c, err
	}
	l := m.launch
	if bin, err := m.binary(); err == nil {
		l.Binary = bin
	} else if c, derr := keeper.Dial(ctx, l.Socket); derr == nil {
		c.Close() // a keeper runs; only a new one could not be started
	} else {
		return nil, fmt.Errorf("%w (install it beside containerd-kuasar or set keeper_path): %w", err, errdefs.ErrFailedPrecondition)
	}
	cctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	c, err := keeper.Connect(cctx, l)
	if err != nil {
		return nil, fmt.Errorf("connecting to the process keeper: %w: %w", err, errdefs.ErrUnavailable)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		c.Close()
		return nil, fmt.Errorf("monitor closed: %w", errdefs.ErrUnavailable)
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
	wctx, w := m.register(ref)
	go m.watch(wctx, w, ref, fn)
}

// Rewatch is Watch for a process recorded before a restart: an exit the
// keeper kept meanwhile is delivered before Rewatch returns, so that the
// process is known to have exited before anyone asks about it. When the
// keeper cannot be asked now, the process is watched as with Watch: its
// exit is reported once the keeper is back.
func (m *Monitor) Rewatch(ctx context.Context, ref keeper.ProcessRef, fn func(keeper.Exit)) error {
	c, err := m.conn(ctx)
	if err == nil {
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		var e *keeper.Exit
		e, err = c.Wait(cctx, ref, true)
		cancel()
		switch {
		case errdefs.IsNotFound(err):
			m.deliver(ref, nil, keeper.Exit{Process: ref, Status: LostStatus, At: time.Now(), Lost: true}, fn)
			return nil
		case err == nil && e != nil:
			m.deliver(ref, nil, *e, fn)
			return nil
		}
	}
	if err != nil {
		log.G(ctx).WithError(err).WithField("process", ref).Warn("the keeper cannot tell now whether a process exited while the daemon was down; watching it")
	}
	m.Watch(ctx, ref, fn)
	return nil
}

func (m *Monitor) register(ref keeper.ProcessRef) (context.Context, *watcher) {
	ctx, cancel := context.WithCancel(context.Background())
	w := &watcher{cancel: cancel}
	m.mu.Lock()
	if old, ok := m.watchers[ref]; ok {
		old.cancel()
	}
	m.watchers[ref] = w
	m.mu.Unlock()
	return ctx, w
}

// maxBackoff bounds the wait between two attempts to reach a keeper that
// is gone.
const maxBackoff = 5 * time.Second

func (m *Monitor) watch(ctx context.Context, w *watcher, ref keeper.ProcessRef, fn func(keeper.Exit)) {
	backoff, warned := retryBackoff, false
	for {
		c, err := m.conn(ctx)
		if err == nil {
			var e *keeper.Exit
			e, err = c.Wait(ctx, ref, false)
			switch {
			case err == nil && e != nil:
				m.deliver(ref, w, *e, fn)
				return
			case errdefs.IsNotFound(err):
				log.G(ctx).WithField("process", ref).Warn("process ended with no exit status kept")
				m.deliver(ref, w, keeper.Exit{Process: ref, Status: LostStatus, At: time.Now(), Lost: true}, fn)
				return
			}
		}
		if ctx.Err() != nil {
			return // unwatched, or the monitor closed
		}
		if !warned && err != nil && !unixsock.IsClosed(err) {
			log.G(ctx).WithError(err).WithField("process", ref).Warn("waiting for a process through the keeper; retrying")
			warned = true
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// deliver reports an exit once and acknowledges it; w is the watcher that
// saw it (nil: none was registered).
func (m *Monitor) deliver(ref keeper.ProcessRef, w *watcher, e keeper.Exit, fn func(keeper.Exit)) {
	if w != nil {
		m.mu.Lock()
		if m.watchers[ref] == w {
			delete(m.watchers, ref)
		}
		m.mu.Unlock()
		w.cancel()
	}
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

// Stats is what the monitor knows of the keeper now, without reaching it.
type Stats struct {
	// KeeperPid is the pid of the keeper connected to (0: none).
	KeeperPid int
	// Watched is how many processes' exits are waited for.
	Watched int
}

// Stats reports the keeper connection and the processes watched.
func (m *Monitor) Stats() Stats {
	c, _ := m.current()
	m.mu.Lock()
	defer m.mu.Unlock()
	st := Stats{Watched: len(m.watchers)}
	if c != nil {
		st.KeeperPid = c.KeeperPid
	}
	return st
}

// binary resolves the kuasar-keeper executable.
func (m *Monitor) binary() (string, error) {
	if m.launch.Binary != "" {
		return m.launch.Binary, nil
	}
	if m.find != nil {
		return m.find()
	}
	return "", fmt.Errorf("no kuasar-keeper binary: %w", errdefs.ErrNotFound)
}

// KeeperBinary is the kuasar-keeper executable ("" if none is found).
func (m *Monitor) KeeperBinary() string {
	bin, _ := m.binary()
	return bin
}
