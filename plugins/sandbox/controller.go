package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/platforms"
	"github.com/containerd/typeurl/v2"
	imagespec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/metrics"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

// CRI states a controller must report.
const (
	stateReady    = "SANDBOX_READY"
	stateNotReady = "SANDBOX_NOTREADY"
)

// Paths tells a controller where its files go.
type Paths struct {
	// State is the controller's state directory (tmpfs on a node).
	State string
	// Sockets is where task endpoints are created; it must be short.
	Sockets string
}

// Controller implements containerd's sandbox.Controller for one Kind.
type Controller struct {
	id        string
	kind      Kind
	paths     Paths
	publisher events.Publisher
	metrics   *metrics.Controller

	mu        sync.Mutex
	sandboxes map[string]*entry
	// handlers are the CRI runtime handlers of the sandboxes seen (a few:
	// the ones the node's config gives this controller).
	handlers map[string]bool
}

var _ sandbox.Controller = (*Controller)(nil)

type entry struct {
	mu       sync.Mutex
	sb       *Sandbox
	inst     Instance
	tasks    *task.Service
	endpoint *task.Endpoint

	state      string // "" (created), SANDBOX_READY or SANDBOX_NOTREADY; set with setState
	shown      atomic.Value
	handler    string        // the CRI runtime handler (metrics label)
	createTook time.Duration // how long Create took (for metrics)
	exitStatus uint32
	exitedAt   time.Time
	exited     chan struct{}
	exitOnce   sync.Once
	// lost is set for a sandbox its kind could not recover: it is not
	// the kind's any more (Reconcile removes what is left of it).
	lost bool
}

// closeExited releases Wait; it may be called more than once.
func (e *entry) closeExited() {
	e.exitOnce.Do(func() { close(e.exited) })
}

// NewController returns the controller of kind, registered as id.
func NewController(id string, kind Kind, paths Paths, publisher events.Publisher, opts ...Option) *Controller {
	c := &Controller{
		id:        id,
		kind:      kind,
		paths:     paths,
		publisher: publisher,
		sandboxes: map[string]*entry{},
		handlers:  map[string]bool{id: true},
	}
	for _, o := range opts {
		o(c)
	}
	return c
}

func (c *Controller) get(id string) (*entry, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.sandboxes[id]
	if !ok {
		return nil, fmt.Errorf("sandbox %q in %s: %w", id, c.id, errdefs.ErrNotFound)
	}
	return e, nil
}

// PortForwarder returns the port forwarder of sandbox id, if the sandbox
// is this controller's and its kind forwards ports itself.
func (c *Controller) PortForwarder(id string) (PortForwarder, bool) {
	e, err := c.get(id)
	if err != nil {
		return nil, false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	pf, ok := e.inst.(PortForwarder)
	return pf, ok && !e.lost && e.state == stateReady
}

func (c *Controller) socketPath(ns, id string) string {
	h := sha256.Sum256([]byte(c.id + "/" + ns + "/" + id))
	return filepath.Join(c.paths.Sockets, hex.EncodeToString(h[:12])+".sock")
}

// Create builds a sandbox's isolation.
func (c *Controller) Create(ctx context.Context, info sandbox.Sandbox, opts ...sandbox.CreateOpt) (retErr error) {
	began := time.Now()
	handler := runtimeHandler(info)
	if handler == "" {
		handler = c.id
	}
	defer func() {
		if retErr != nil {
			c.metrics.SandboxStartFailed(handler)
		}
	}()
	if err := identifiers.Validate(info.ID); err != nil {
		return err
	}
	var o sandbox.CreateOptions
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return err
		}
	}
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return err
	}
	config := &runtime.PodSandboxConfig{}
	if o.Options != nil && o.Options.GetValue() != nil {
		if err := typeurl.UnmarshalTo(o.Options, config); err != nil {
			return fmt.Errorf("decoding pod sandbox config: %w: %w", err, errdefs.ErrInvalidArgument)
		}
	}

	c.mu.Lock()
	if _, ok := c.sandboxes[info.ID]; ok {
		c.mu.Unlock()
		return fmt.Errorf("sandbox %q: %w", info.ID, errdefs.ErrAlreadyExists)
	}
	e := c.newEntry(handler)
	e.mu.Lock()
	defer e.mu.Unlock()
	c.sandboxes[info.ID] = e
	c.mu.Unlock()
	defer func() {
		if retErr != nil {
			c.mu.Lock()
			delete(c.sandboxes, info.ID)
			c.mu.Unlock()
		}
	}()

	sb := &Sandbox{
		ID:          info.ID,
		Namespace:   ns,
		Config:      config,
		NetNSPath:   o.NetNSPath,
		Annotations: o.Annotations,
		CreatedAt:   time.Now().UTC(),
		Handler:     handler,
		Dir:         filepath.Join(c.paths.State, info.ID),
	}
	sb.exit = func(status uint32) { c.exitedOnItsOwn(e, status) }
	if err := os.MkdirAll(sb.Dir, 0o700); err != nil {
		return fmt.Errorf("creating sandbox dir: %w", err)
	}
	defer func() {
		if retErr != nil {
			if err := removeDir(sb.Dir); err != nil {
				log.G(ctx).WithError(err).Warn("removing the directory of a sandbox that failed to create")
			}
		}
	}()
	if err := WritePodFiles(sb); err != nil {
		return fmt.Errorf("writing the pod's files: %w", err)
	}

	inst, err := c.kind.Create(ctx, sb)
	if err != nil {
		return fmt.Errorf("creating %s sandbox: %w", c.id, err)
	}
	defer func() {
		if retErr != nil {
			if err := inst.Shutdown(context.WithoutCancel(ctx)); err != nil {
				log.G(ctx).WithError(err).Warn("cleaning up a sandbox that failed to create")
			}
		}
	}()
	tasks, err := c.newTasks(sb, inst)
	if err != nil {
		return err
	}
	e.sb, e.inst, e.tasks = sb, inst, tasks
	if err := c.save(e); err != nil {
		return err
	}
	e.createTook = time.Since(began)
	return nil
}

// Start makes the sandbox ready and returns its task endpoint.
func (c *Controller) Start(ctx context.Context, id string) (_ sandbox.ControllerInstance, retErr error) {
	began := time.Now()
	e, err := c.get(id)
	if err != nil {
		return sandbox.ControllerInstance{}, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	defer func() {
		if retErr != nil {
			c.metrics.SandboxStartFailed(e.handler)
		} else {
			c.metrics.SandboxStarted(e.handler, e.createTook+time.Since(began))
		}
	}()
	if e.sb == nil {
		return sandbox.ControllerInstance{}, fmt.Errorf("sandbox %q was not created: %w", id, errdefs.ErrFailedPrecondition)
	}
	if e.state != "" {
		return sandbox.ControllerInstance{}, fmt.Errorf("sandbox %q already started: %w", id, errdefs.ErrFailedPrecondition)
	}
	ep, err := task.Listen(ctx, c.socketPath(e.sb.Namespace, id), e.tasks)
	if err != nil {
		return sandbox.ControllerInstance{}, err
	}
	defer func() {
		if retErr != nil {
			ep.Close()
		}
	}()
	// CRI forgets a sandbox whose Start failed and never shuts it down:
	// undo it all here, as its Create would have.
	defer func() {
		if retErr != nil {
			c.discardLocked(context.WithoutCancel(ctx), e)
		}
	}()
	if err := e.inst.Start(ctx); err != nil {
		return sandbox.ControllerInstance{}, fmt.Errorf("starting %s sandbox: %w", c.id, err)
	}
	spec, err := typeurl.MarshalAny(podSpec(e.sb, e.inst))
	if err != nil {
		return sandbox.ControllerInstance{}, fmt.Errorf("encoding the pod's spec: %w", err)
	}
	e.endpoint = ep
	e.setState(stateReady)
	if err := c.save(e); err != nil {
		e.endpoint = nil
		e.setState("")
		return sandbox.ControllerInstance{}, err
	}
	return sandbox.ControllerInstance{
		SandboxID: id,
		CreatedAt: e.sb.CreatedAt,
		Address:   ep.Address(),
		Version:   task.Version,
		Labels:    map[string]string{"kuasar.io/kind": c.id},
		// What a pause container's spec would say of the pod: CRI stores
		// it with the sandbox, where NRI reads it.
		Spec: spec,
	}, nil
}

// discardLocked undoes a sandbox that failed to start: what its kind made,
// its directory and its entry. Errors are logged: the start's error is the
// one CRI reports.
func (c *Controller) discardLocked(ctx context.Context, e *entry) {
	e.tasks.DeleteAll(ctx)
	if err := e.inst.Shutdown(ctx); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", e.sb.ID).Warn("cleaning up a sandbox that failed to start")
	}
	if err := removeDir(e.sb.Dir); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", e.sb.ID).Warn("removing the directory of a sandbox that failed to start")
	}
	c.mu.Lock()
	delete(c.sandboxes, e.sb.ID)
	c.mu.Unlock()
}

// Platform of the sandbox: the host's.
func (c *Controller) Platform(context.Context, string) (imagespec.Platform, error) {
	return platforms.DefaultSpec(), nil
}

// Stop kills whatever still runs in the sandbox and marks it not ready.
func (c *Controller) Stop(ctx context.Context, id string, opts ...sandbox.StopOpt) error {
	e, err := c.get(id)
	if err != nil {
		return err
	}
	var so sandbox.StopOptions
	for _, o := range opts {
		o(&so)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return c.stopLocked(ctx, e, so.Timeout)
}

func (c *Controller) stopLocked(ctx context.Context, e *entry, timeout *time.Duration) error {
	if e.sb == nil || e.state == stateNotReady {
		return nil
	}
	kctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	if timeout != nil && *timeout > 0 {
		kctx, cancel = context.WithTimeout(ctx, *timeout)
	}
	e.tasks.KillAll(kctx)
	cancel()
	if err := e.inst.Stop(ctx); err != nil {
		return fmt.Errorf("stopping %s sandbox: %w", c.id, err)
	}
	c.markExited(e, 0)
	return nil
}

// markExited is called with e.mu held.
func (c *Controller) markExited(e *entry, status uint32) {
	if e.state == stateNotReady {
		return
	}
	e.setState(stateNotReady)
	e.exitStatus = status
	e.exitedAt = time.Now().UTC()
	// Recorded before anyone is told, so that a restart cannot find the
	// sandbox ready again.
	if err := c.save(e); err != nil {
		log.L.WithError(err).WithField("sandbox", e.sb.ID).Warn("saving sandbox record")
	}
	e.closeExited()
}

func (c *Controller) exitedOnItsOwn(e *entry, status uint32) {
	go func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.state == stateReady {
			log.L.WithField("sandbox", e.sb.ID).WithField("status", status).Warn("sandbox ended on its own")
			c.markExited(e, status)
		}
	}()
}

// Wait blocks until the sandbox stops.
func (c *Controller) Wait(ctx context.Context, id string) (sandbox.ExitStatus, error) {
	e, err := c.get(id)
	if err != nil {
		return sandbox.ExitStatus{}, err
	}
	select {
	case <-e.exited:
	case <-ctx.Done():
		return sandbox.ExitStatus{}, ctx.Err()
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	return sandbox.ExitStatus{ExitStatus: e.exitStatus, ExitedAt: e.exitedAt}, nil
}

// Status reports the sandbox's state.
func (c *Controller) Status(ctx context.Context, id string, verbose bool) (sandbox.ControllerStatus, error) {
	e, err := c.get(id)
	if err != nil {
		return sandbox.ControllerStatus{}, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.sb == nil {
		return sandbox.ControllerStatus{}, fmt.Errorf("sandbox %q is being created: %w", id, errdefs.ErrNotFound)
	}
	st := sandbox.ControllerStatus{
		SandboxID: id,
		State:     stateNotReady,
		CreatedAt: e.sb.CreatedAt,
		ExitedAt:  e.exitedAt,
		Version:   task.Version,
	}
	if e.state == stateReady {
		st.State = stateReady
	}
	if e.endpoint != nil {
		st.Address = e.endpoint.Address()
	}
	info := map[string]any{
		"sandboxer": c.id,
		"state":     st.State,
		"dir":       e.sb.Dir,
		"netns":     e.sb.NetNSPath,
		"address":   st.Address,
	}
	for k, v := range e.inst.Info() {
		info[k] = v
	}
	if verbose {
		info["containers"] = len(e.tasks.Containers())
	}
	b, err := json.Marshal(info)
	if err != nil {
		return sandbox.ControllerStatus{}, err
	}
	// CRI re-encodes "info" as its podsandbox's SandboxInfo, dropping any
	// other field: it gets the fields of that schema (crictl inspectp
	// shows them), and the kind's own details go under their own key.
	pid, _ := info["pid"].(int)
	process := map[string]string{stateReady: "running", stateNotReady: "stopped", "": "created"}[e.state]
	std, err := json.Marshal(map[string]any{
		"pid":           pid,
		"processStatus": process,
		"runtimeType":   runtimeTypeOf(e.sb),
		"config":        e.sb.Config,
		"runtimeSpec":   podSpec(e.sb, e.inst),
	})
	if err != nil {
		return sandbox.ControllerStatus{}, err
	}
	st.Info = map[string]string{"info": string(std), InfoKey: string(b)}
	return st, nil
}

// InfoKey is the key of a kuasar sandbox's own details in its status info
// (`crictl inspectp` shows it as "kuasar").
const InfoKey = "kuasar"

// runtimeTypeOf is the CRI runtime type of the sandbox's handler.
func runtimeTypeOf(*Sandbox) string { return "io.containerd.kuasar.v1" }

// Shutdown releases everything the sandbox holds and forgets it.
func (c *Controller) Shutdown(ctx context.Context, id string) error {
	e, err := c.get(id)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.sb == nil {
		return fmt.Errorf("sandbox %q is being created: %w", id, errdefs.ErrFailedPrecondition)
	}
	if err := c.stopLocked(ctx, e, nil); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", id).Warn("stopping sandbox at shutdown")
	}
	e.tasks.DeleteAll(ctx)
	if e.endpoint != nil {
		if err := e.endpoint.Close(); err != nil {
			log.G(ctx).WithError(err).Warn("closing task endpoint")
		}
		e.endpoint = nil
	}
	if err := e.inst.Shutdown(ctx); err != nil {
		return fmt.Errorf("shutting down %s sandbox: %w", c.id, err)
	}
	if err := removeDir(e.sb.Dir); err != nil {
		return fmt.Errorf("removing sandbox dir: %w", err)
	}
	c.mu.Lock()
	delete(c.sandboxes, id)
	c.mu.Unlock()
	return nil
}

// Metrics returns pod-level metrics.
func (c *Controller) Metrics(ctx context.Context, id string) (*types.Metric, error) {
	e, err := c.get(id)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	inst := e.inst
	e.mu.Unlock()
	if inst == nil {
		return nil, fmt.Errorf("sandbox %q is being created: %w", id, errdefs.ErrNotFound)
	}
	return inst.Metrics(ctx)
}

// Update has nothing to change in a running sandbox.
func (c *Controller) Update(ctx context.Context, id string, _ sandbox.Sandbox, fields ...string) error {
	_, err := c.get(id)
	return err
}

// errNotRecorded marks a directory without a sandbox record.
var errNotRecorded = errors.New("no sandbox record")

// newTasks returns the task service of a sandbox, which gives every CRI
// container the pod's files and /dev/shm.
func (c *Controller) newTasks(sb *Sandbox, inst Instance) (*task.Service, error) {
	var opts []task.Option
	if c.metrics != nil {
		opts = append(opts, task.WithMetrics(taskMetrics{m: c.metrics, handler: sb.Handler}))
	}
	return task.NewService(sb.ID, sb.Namespace, filepath.Join(sb.Dir, "tasks"), inst.Runtime(), c.publisher,
		func(ctr *task.Container) error {
			AddPodMounts(sb, ctr.Spec)
			return nil
		}, opts...)
}

// removeDir removes a sandbox's directory, unmounting first whatever is
// still mounted under it (namespace files, a /dev/shm), so that nothing is
// left pinned.
func removeDir(dir string) error {
	if err := removeMounts(dir); err != nil {
		return err
	}
	return os.RemoveAll(dir)
}

// removeMounts unmounts everything mounted under dir.
func removeMounts(dir string) error {
	if err := mount.UnmountRecursive(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unmounting under %s: %w", dir, err)
	}
	return nil
}
