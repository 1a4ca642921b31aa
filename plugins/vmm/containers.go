package vmm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2/stats"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

// containers runs a pod's containers in its VM: every call goes to the
// task service of the guest's agent. A process has no pid of its own on
// the node: it reports the hypervisor's.
type containers struct {
	pod *pod

	mu      sync.Mutex
	streams map[string]*streams // by process key
}

var _ task.Runtime = (*containers)(nil)

// outputDrain bounds the wait for a process's output to be copied out
// after it exited, before its exit is reported.
const outputDrain = 2 * time.Second

func procKey(p *task.Process) string { return p.Container.ID + "/" + p.ExecID }

// marker stands for a stream the process has: the guest makes the stream
// itself, only whether there is one matters.
func marker(path, name string) string {
	if path == "" {
		return ""
	}
	return name
}

func (r *containers) conn() (*guestConn, error) { return r.pod.conn() }

// call runs fn on the session to the pod's guest (its agent's task
// service and Agent API), once the guest is reached.
func (r *containers) call(ctx context.Context, fn func(context.Context, *session) error) error {
	g, err := r.conn()
	if err != nil {
		return err
	}
	return g.call(ctx, true, fn)
}

// shareDir is a container's directory in the pod's share.
func (r *containers) shareDir(c *task.Container) string {
	return filepath.Join(r.pod.shareRW(), c.ID)
}

func (r *containers) sharedPID() bool {
	return r.pod.sb.Config.GetLinux().GetSecurityContext().GetNamespaceOptions().GetPid() == runtime.NamespaceMode_POD
}

// Create mounts the container's rootfs and binds in the share, writes its
// guest spec and creates it in the guest.
func (r *containers) Create(ctx context.Context, c *task.Container) (retErr error) {
	g, err := r.conn()
	if err != nil {
		return err
	}
	gspec, binds, err := guestSpec(c.Spec, c.ID, r.sharedPID())
	if err != nil {
		return err
	}
	share := r.pod.shareRW()
	if err := makeInShare(share, filepath.Join(c.ID, "rootfs"), true); err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			r.unshare(ctx, c)
		}
	}()
	ms, err := r.shareMounts(c, binds)
	if err != nil {
		return err
	}
	err = r.pod.attach(ms)
	closeTrees(ms)
	if err != nil {
		return fmt.Errorf("mounting the container's files for the VM: %w", err)
	}
	b, err := json.Marshal(gspec)
	if err != nil {
		return err
	}
	if err := writeInShare(share, filepath.Join(c.ID, "config.json"), b, 0o600); err != nil {
		return err
	}
	io := c.Init.IO
	err = g.call(ctx, false, func(ctx context.Context, s *session) error {
		_, err := s.tasks.Create(ctx, &taskAPI.CreateTaskRequest{
			ID:       c.ID,
			Bundle:   guest.BundleDir(c.ID),
			Terminal: io.Terminal,
			Stdin:    marker(io.Stdin, "stdin"),
			Stdout:   marker(io.Stdout, "stdout"),
			Stderr:   marker(io.Stderr, "stderr"),
		})
		return err
	})
	if err != nil {
		return fmt.Errorf("creating the container in the VM: %w", err)
	}
	defer func() {
		if retErr != nil {
			r.deleteInGuest(context.WithoutCancel(ctx), c.Init)
		}
	}()
	c.Init.SetPid(r.pod.vmPid())
	return r.attach(c.Init, false)
}

// attach starts the pumps of p's streams.
func (r *containers) attach(p *task.Process, resumed bool) error {
	g, err := r.conn()
	if err != nil {
		return err
	}
	s, err := startStreams(g, p, resumed)
	if err != nil {
		return err
	}
	r.mu.Lock()
	if r.streams == nil {
		r.streams = map[string]*streams{}
	}
	if old := r.streams[procKey(p)]; old != nil {
		old.stop()
	}
	r.streams[procKey(p)] = s
	r.mu.Unlock()
	return nil
}

func (r *containers) streamsOf(p *task.Process) *streams {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.streams[procKey(p)]
}

func (r *containers) detach(p *task.Process) {
	r.mu.Lock()
	s := r.streams[procKey(p)]
	delete(r.streams, procKey(p))
	r.mu.Unlock()
	if s != nil {
		s.stop()
	}
}

// Start starts the init process or an exec in the guest, and waits for its
// exit there.
func (r *containers) Start(ctx context.Context, p *task.Process) error {
	g, err := r.conn()
	if err != nil {
		return err
	}
	err = g.call(ctx, false, func(ctx context.Context, s *session) error {
		_, err := s.tasks.Start(ctx, &taskAPI.StartRequest{ID: p.Container.ID, ExecID: p.ExecID})
		return err
	})
	if err != nil {
		return fmt.Errorf("starting in the VM: %w", err)
	}
	p.SetPid(r.pod.vmPid())
	go r.wait(p)
	return nil
}

// wait reports p's exit once the guest has it, its output copied out, and
// an OOM kill of an init (the guest cgroup's memory events) before it.
func (r *containers) wait(p *task.Process) {
	ctx := context.Background()
	g, err := r.conn()
	var resp *taskAPI.WaitResponse
	if err == nil {
		err = g.call(ctx, true, func(ctx context.Context, s *session) error {
			var err error
			resp, err = s.tasks.Wait(ctx, &taskAPI.WaitRequest{ID: p.Container.ID, ExecID: p.ExecID})
			return err
		})
	}
	status, at := uint32(255), time.Now()
	switch {
	case err == nil:
		status, at = resp.GetExitStatus(), resp.GetExitedAt().AsTime()
	case errors.Is(err, errVMGone):
		log.G(ctx).WithField("container", p.Container.ID).WithField("exec", p.ExecID).Warn("the VM exited with the process in it")
	default:
		log.G(ctx).WithError(err).WithField("container", p.Container.ID).WithField("exec", p.ExecID).Warn("waiting for a process in the VM")
	}
	if s := r.streamsOf(p); s != nil {
		s.waitOutput(outputDrain)
	}
	if p.ExecID == "" && err == nil {
		if n, err := r.oomKills(ctx, p.Container); err == nil && n > 0 {
			p.Container.OOM()
		}
	}
	p.Exited(int(status), at)
}

// oomKills reads the OOM kills of a container's guest cgroup.
func (r *containers) oomKills(ctx context.Context, c *task.Container) (uint64, error) {
	a, err := r.Stats(ctx, c)
	if err != nil {
		return 0, err
	}
	v, err := typeurl.UnmarshalAny(a)
	if err != nil {
		return 0, err
	}
	m, ok := v.(*stats.Metrics)
	if !ok {
		return 0, fmt.Errorf("guest stats of type %T", v)
	}
	return m.GetMemoryEvents().GetOomKill(), nil
}

// Exec prepares an exec in the guest; Start runs it.
func (r *containers) Exec(ctx context.Context, p *task.Process) error {
	if len(p.Spec.Args) == 0 {
		return fmt.Errorf("exec %q has no command: %w", p.ExecID, errdefs.ErrInvalidArgument)
	}
	g, err := r.conn()
	if err != nil {
		return err
	}
	a, err := typeurl.MarshalAnyToProto(p.Spec)
	if err != nil {
		return err
	}
	io := p.IO
	err = g.call(ctx, false, func(ctx context.Context, s *session) error {
		_, err := s.tasks.Exec(ctx, &taskAPI.ExecProcessRequest{
			ID:       p.Container.ID,
			ExecID:   p.ExecID,
			Spec:     a,
			Terminal: io.Terminal,
			Stdin:    marker(io.Stdin, "stdin"),
			Stdout:   marker(io.Stdout, "stdout"),
			Stderr:   marker(io.Stderr, "stderr"),
		})
		return err
	})
	if err != nil {
		return fmt.Errorf("exec in the VM: %w", err)
	}
	if err := r.attach(p, false); err != nil {
		r.deleteInGuest(context.WithoutCancel(ctx), p)
		return err
	}
	return nil
}

func (r *containers) Kill(ctx context.Context, p *task.Process, sig unix.Signal, all bool) error {
	return r.call(ctx, func(ctx context.Context, s *session) error {
		_, err := s.tasks.Kill(ctx, &taskAPI.KillRequest{ID: p.Container.ID, ExecID: p.ExecID, Signal: uint32(sig), All: all})
		return err
	})
}

// Delete releases a process in the guest; for an init, the container's
// mounts in the share too.
func (r *containers) Delete(ctx context.Context, p *task.Process) error {
	r.detach(p)
	r.deleteInGuest(ctx, p)
	if p.ExecID == "" {
		for _, e := range p.Container.Execs() {
			r.detach(e)
		}
		r.unshare(ctx, p.Container)
	}
	return nil
}

// deleteInGuest deletes p in the guest, if the VM is still there.
func (r *containers) deleteInGuest(ctx context.Context, p *task.Process) {
	g, err := r.conn()
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err = g.call(ctx, true, func(ctx context.Context, s *session) error {
		_, err := s.tasks.Delete(ctx, &taskAPI.DeleteRequest{ID: p.Container.ID, ExecID: p.ExecID})
		return err
	})
	if err != nil && !errdefs.IsNotFound(err) && !errors.Is(err, errVMGone) {
		log.G(ctx).WithError(err).WithField("container", p.Container.ID).WithField("exec", p.ExecID).Warn("deleting in the VM")
	}
}

// stageDir is where c's rootfs is mounted on the node to be cloned: in
// the pod's directory, outside the share (the guest never sees it).
func (r *containers) stageDir(c *task.Container) string {
	return filepath.Join(r.pod.sb.Dir, "stage", c.ID)
}

// shareMounts clones what the guest must see of c: its rootfs (mounted on
// the node first, where containerd's mounts are made, in the stage
// directory and only as long as it takes to clone) and its binds, with
// their targets made in c's share directory.
func (r *containers) shareMounts(c *task.Container, binds []hostBind) (_ []shareMount, retErr error) {
	var ms []shareMount
	defer func() {
		if retErr != nil {
			closeTrees(ms)
		}
	}()
	rel := func(p string) string { return filepath.Join(c.ID, p) }
	switch {
	case len(c.Rootfs) > 0:
		stage := r.stageDir(c)
		if err := os.MkdirAll(stage, 0o700); err != nil {
			return nil, err
		}
		defer os.Remove(stage)
		if err := c.MountRootfs(stage); err != nil {
			return nil, err
		}
		m, err := cloneTree(stage, hostBind{}, rel("rootfs"))
		if uerr := mount.UnmountRecursive(stage, unix.MNT_DETACH); uerr != nil && err == nil {
			m.tree.Close()
			err = fmt.Errorf("unmounting rootfs from the node: %w", uerr)
		}
		if err != nil {
			return nil, err
		}
		ms = append(ms, m)
	case c.Spec.Root != nil && c.Spec.Root.Path != "":
		// A rootfs containerd did not mount for us: the bundle's.
		src := c.Spec.Root.Path
		if !filepath.IsAbs(src) {
			src = filepath.Join(c.Bundle, src)
		}
		m, err := cloneTree(src, hostBind{}, rel("rootfs"))
		if err != nil {
			return nil, err
		}
		ms = append(ms, m)
	}
	share := r.pod.shareRW()
	for _, b := range binds {
		st, err := os.Stat(b.Source)
		if err != nil {
			return nil, fmt.Errorf("mount source %s: %w", b.Source, err)
		}
		if err := makeInShare(share, rel(b.Target), st.IsDir()); err != nil {
			return nil, err
		}
		m, err := cloneTree(b.Source, b, rel(b.Target))
		if err != nil {
			return nil, err
		}
		ms = append(ms, m)
	}
	return ms, nil
}

// unshare removes a container's directory from the pod's share: its mounts
// in the VM's namespace first, and a rootfs a crash left mounted in the
// stage directory. Nothing is resolved through the share on the node:
// RemoveAll removes a symlink the guest left, not what it points to.
func (r *containers) unshare(ctx context.Context, c *task.Container) {
	if err := r.pod.detach(c.ID); err != nil {
		log.G(ctx).WithError(err).WithField("container", c.ID).Warn("unmounting the container's files in the VM's namespace")
	}
	stage := r.stageDir(c)
	if err := mount.UnmountRecursive(stage, unix.MNT_DETACH); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).WithField("container", c.ID).Warn("unmounting the container's staged rootfs")
	} else {
		_ = os.RemoveAll(stage)
	}
	_ = os.RemoveAll(r.shareDir(c))
}

func (r *containers) Pids(ctx context.Context, c *task.Container) ([]*tasktypes.ProcessInfo, error) {
	var resp *taskAPI.PidsResponse
	err := r.call(ctx, func(ctx context.Context, s *session) error {
		var err error
		resp, err = s.tasks.Pids(ctx, &taskAPI.PidsRequest{ID: c.ID})
		return err
	})
	if err != nil {
		return nil, err
	}
	return resp.GetProcesses(), nil
}

func (r *containers) ResizePty(ctx context.Context, p *task.Process, w, h uint32) error {
	return r.call(ctx, func(ctx context.Context, s *session) error {
		_, err := s.tasks.ResizePty(ctx, &taskAPI.ResizePtyRequest{ID: p.Container.ID, ExecID: p.ExecID, Width: w, Height: h})
		return err
	})
}

func (r *containers) CloseIO(ctx context.Context, p *task.Process) error {
	g, err := r.conn()
	if err != nil {
		return err
	}
	if s := r.streamsOf(p); s != nil {
		return s.closeStdin(ctx, g)
	}
	return nil
}

// Update changes the container's resources within the VM.
func (r *containers) Update(ctx context.Context, c *task.Container, res *specs.LinuxResources, ann map[string]string) error {
	if res == nil {
		return nil
	}
	a, err := typeurl.MarshalAnyToProto(res)
	if err != nil {
		return err
	}
	return r.call(ctx, func(ctx context.Context, s *session) error {
		_, err := s.tasks.Update(ctx, &taskAPI.UpdateTaskRequest{ID: c.ID, Resources: a, Annotations: ann})
		return err
	})
}

// Stats are the guest's figures of the container (cgroup v2 metrics).
func (r *containers) Stats(ctx context.Context, c *task.Container) (typeurl.Any, error) {
	var resp *taskAPI.StatsResponse
	err := r.call(ctx, func(ctx context.Context, s *session) error {
		var err error
		resp, err = s.tasks.Stats(ctx, &taskAPI.StatsRequest{ID: c.ID})
		return err
	})
	if err != nil {
		return nil, err
	}
	return resp.GetStats(), nil
}

func (r *containers) Pause(ctx context.Context, c *task.Container) error {
	return r.call(ctx, func(ctx context.Context, s *session) error {
		_, err := s.tasks.Pause(ctx, &taskAPI.PauseRequest{ID: c.ID})
		return err
	})
}

func (r *containers) Resume(ctx context.Context, c *task.Container) error {
	return r.call(ctx, func(ctx context.Context, s *session) error {
		_, err := s.tasks.Resume(ctx, &taskAPI.ResumeRequest{ID: c.ID})
		return err
	})
}

// Recover takes a container back after a daemon restart: its output kept
// in the guest meanwhile is copied out, and its exit (kept by the guest)
// reported.
func (r *containers) Recover(ctx context.Context, c *task.Container) error {
	if c.Init.Status() == tasktypes.Status_STOPPED {
		return nil
	}
	if _, err := r.conn(); err != nil {
		return task.ErrNotRecoverable
	}
	c.Init.SetPid(r.pod.vmPid())
	if err := r.attach(c.Init, true); err != nil {
		return err
	}
	if c.Init.Status() == tasktypes.Status_RUNNING {
		go r.wait(c.Init)
	}
	return nil
}
