// Package monitor is containerd-kuasar's side of the process keeper (see
// pkg/keeper): an internal plugin, shared by the sandbox controllers, that
// starts processes through the keeper and routes each exit to whoever
// watches that pid. It connects lazily, restarts the keeper when it is gone,
// and after a daemon restart replays the exits the keeper kept meanwhile.
package monitor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/containerd/log"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/launch"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
)

// pendingTTL is how long an exit nobody watches is kept before it is
// acknowledged: long enough to cover the window between a process starting
// and its starter registering the pid.
const pendingTTL = time.Minute

// LostStatus is reported for a process whose exit status is unknown because
// the keeper that reaped it is gone.
const LostStatus = 255

// Monitor spawns processes through the keeper and dispatches their exits.
type Monitor struct {
	launch keeper.Launch

	mu        sync.Mutex
	client    *keeper.Client
	keeperPid int
	watchers  map[int]*watcher
	pending   map[int]pendingExit
	closed    bool
}

type watcher struct {
	start uint64
	fn    func(keeper.Exit)
}

type pendingExit struct {
	exit keeper.Exit
	at   time.Time
}

// New returns a Monitor for the keeper described by l.
func New(l keeper.Launch) *Monitor {
	return &Monitor{
		launch:   l,
		watchers: map[int]*watcher{},
		pending:  map[int]pendingExit{},
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
		return nil, errors.New("monitor closed")
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
		return nil, errors.New("no kuasar-keeper binary: install it beside containerd-kuasar or set keeper_path")
	}
	c, err := keeper.Connect(ctx, m.launch)
	if err != nil {
		return nil, fmt.Errorf("connecting to the process keeper: %w", err)
	}
	backlog, err := c.Subscribe(ctx, m.onExit)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("subscribing to keeper exits: %w", err)
	}
	lost := m.keeperPid != 0 && m.keeperPid != c.KeeperPid
	m.client, m.keeperPid = c, c.KeeperPid
	log.G(ctx).WithField("keeper", c.KeeperPid).Debug("connected to process keeper")
	for _, e := range backlog {
		m.dispatchLocked(e)
	}
	if lost {
		// The previous keeper died: the processes it parented are now
		// orphans of init and their statuses will not reach us.
		log.G(ctx).WithField("keeper", c.KeeperPid).Error("process keeper was replaced; exit statuses of running workloads will be reported as 255")
		for pid := range m.watchers {
			go m.watchOrphan(pid)
		}
	}
	go m.watchConn(c)
	return c, nil
}

// watchConn reconnects as soon as the keeper connection drops, so exits are
// not held back until the next spawn.
func (m *Monitor) watchConn(c *keeper.Client) {
	<-c.Done()
	m.mu.Lock()
	closed := m.closed
	m.mu.Unlock()
	if closed {
		return
	}
	for i := 0; i < 50; i++ {
		if _, err := m.conn(context.Background()); err == nil {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	log.L.Error("could not reconnect to the process keeper")
}

// Connect makes sure the keeper runs and its backlog of exits is loaded.
func (m *Monitor) Connect(ctx context.Context) error {
	_, err := m.conn(ctx)
	return err
}

func (m *Monitor) onExit(e keeper.Exit) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.dispatchLocked(e)
}

// dispatchLocked is called with m.mu held.
func (m *Monitor) dispatchLocked(e keeper.Exit) {
	if w, ok := m.watchers[e.Pid]; ok {
		delete(m.watchers, e.Pid)
		go m.deliver(w, e)
		return
	}
	m.pending[e.Pid] = pendingExit{exit: e, at: time.Now()}
	m.expireLocked()
}

func (m *Monitor) deliver(w *watcher, e keeper.Exit) {
	w.fn(e)
	m.mu.Lock()
	c := m.client
	m.mu.Unlock()
	if c != nil {
		if err := c.Ack(context.Background(), e.Pid); err != nil {
			log.L.WithError(err).Debug("acknowledging exit")
		}
	}
}

func (m *Monitor) expireLocked() {
	var old []int
	for pid, p := range m.pending {
		if time.Since(p.at) > pendingTTL {
			old = append(old, pid)
			delete(m.pending, pid)
		}
	}
	if len(old) > 0 && m.client != nil {
		c := m.client
		go func() { _ = c.Ack(context.Background(), old...) }()
	}
}

// Watch calls fn once, when the process pid (started at start, in clock
// ticks since boot, as /proc/PID/stat reports; 0 skips the check) exits.
// An exit that arrived before Watch is delivered at once. A process that is
// already gone with no recorded exit is reported with LostStatus.
func (m *Monitor) Watch(ctx context.Context, pid int, start uint64, fn func(keeper.Exit)) error {
	return m.watch(ctx, pid, start, fn, false)
}

// Rewatch is Watch for a process recorded before a restart: an exit the
// keeper kept meanwhile is delivered before Rewatch returns, so that the
// process is known to have exited before anyone asks about it.
func (m *Monitor) Rewatch(ctx context.Context, pid int, start uint64, fn func(keeper.Exit)) error {
	return m.watch(ctx, pid, start, fn, true)
}

func (m *Monitor) watch(ctx context.Context, pid int, start uint64, fn func(keeper.Exit), now bool) error {
	deliver := func(w *watcher, e keeper.Exit) {
		if now {
			m.deliver(w, e)
		} else {
			go m.deliver(w, e)
		}
	}
	c, err := m.conn(ctx)
	if err != nil {
		return err
	}
	w := &watcher{start: start, fn: fn}
	m.mu.Lock()
	if e, ok := m.claimLocked(pid); ok {
		m.mu.Unlock()
		deliver(w, e)
		return nil
	}
	if proc.Alive(pid, start) {
		m.watchers[pid] = w
		m.mu.Unlock()
		return nil
	}
	m.mu.Unlock()
	// Gone already: its exit may still be on its way from the keeper.
	if err := c.Sync(ctx); err != nil {
		log.G(ctx).WithError(err).Warn("syncing with the keeper")
	}
	m.mu.Lock()
	e, ok := m.claimLocked(pid)
	m.mu.Unlock()
	if !ok {
		log.G(ctx).WithField("pid", pid).Warn("process ended with no exit status recorded")
		e = keeper.Exit{Pid: pid, Status: LostStatus, At: time.Now()}
	}
	deliver(w, e)
	return nil
}

// claimLocked takes the pending exit of pid, if there is one.
func (m *Monitor) claimLocked(pid int) (keeper.Exit, bool) {
	p, ok := m.pending[pid]
	if !ok {
		return keeper.Exit{}, false
	}
	delete(m.pending, pid)
	return p.exit, true
}

// Unwatch drops the watcher of pid, if any.
func (m *Monitor) Unwatch(pid int) {
	m.mu.Lock()
	delete(m.watchers, pid)
	m.mu.Unlock()
}

// watchOrphan reports the end of a process whose keeper died, with an
// unknown status, using a pidfd since it is no longer a child of ours.
func (m *Monitor) watchOrphan(pid int) {
	if err := proc.WaitPidfd(pid); err != nil {
		log.L.WithError(err).WithField("pid", pid).Debug("waiting for orphan")
	}
	m.onExit(keeper.Exit{Pid: pid, Status: LostStatus, At: time.Now()})
}

// Spawn starts a process as a child of the keeper (see keeper.SpawnRequest).
func (m *Monitor) Spawn(ctx context.Context, req keeper.SpawnRequest, files ...*os.File) (int, *keeper.Exit, error) {
	c, err := m.conn(ctx)
	if err != nil {
		return 0, nil, err
	}
	return c.Spawn(ctx, req, files...)
}

// PutFD lets the keeper hold a duplicate of f under key.
func (m *Monitor) PutFD(ctx context.Context, key string, f *os.File) error {
	c, err := m.conn(ctx)
	if err != nil {
		return err
	}
	return c.PutFD(ctx, key, f)
}

// GetFD takes back a duplicate of the descriptor held under key.
func (m *Monitor) GetFD(ctx context.Context, key string) (*os.File, error) {
	c, err := m.conn(ctx)
	if err != nil {
		return nil, err
	}
	return c.GetFD(ctx, key)
}

// DropFD releases what the keeper holds under key (or under every key
// starting with it).
func (m *Monitor) DropFD(ctx context.Context, key string, prefix bool) error {
	c, err := m.conn(ctx)
	if err != nil {
		return err
	}
	return c.DropFD(ctx, key, prefix)
}

// Close drops the keeper connection; the keeper and its children live on.
func (m *Monitor) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	if m.client != nil {
		return m.client.Close()
	}
	return nil
}

// KeeperBinary is the kuasar-keeper executable ("" if none was found).
func (m *Monitor) KeeperBinary() string { return m.launch.Binary }
