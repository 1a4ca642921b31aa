package appkernel

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
	"github.com/kuasar-io/containerd-kuasar/plugins/monitor"
)

// runscEnv is the environment of every runsc command: nothing of the
// daemon's own leaks into the sandbox.
var runscEnv = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

// commandTimeout bounds a runsc command.
const commandTimeout = 2 * time.Minute

// runscCLI runs runsc commands for one sandbox: the same global flags for
// every command of it, as runsc wants.
type runscCLI struct {
	path  string
	flags []string
	// log is the sandbox's runsc log (JSON lines); errors are read back
	// from it.
	log string
}

// argv is a full command line.
func (r *runscCLI) argv(args ...string) []string {
	return append(append([]string{r.path}, r.flags...), args...)
}

// run executes a short runsc command, one that leaves no process behind,
// from the daemon.
func (r *runscCLI) run(ctx context.Context, args ...string) ([]byte, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, commandTimeout)
		defer cancel()
	}
	mark := r.logSize()
	cmd := exec.CommandContext(ctx, r.path, append(append([]string{}, r.flags...), args...)...)
	cmd.Env = runscEnv
	cmd.Dir = "/"
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := r.logError(mark)
		if msg == "" {
			msg = strings.TrimSpace(stderr.String())
		}
		return nil, runscFailure(args[0], msg, err)
	}
	return stdout.Bytes(), nil
}

// spawnRequest describes a runsc command spawned through the keeper: one
// that leaves gVisor's processes behind (create starts the sentry and a
// gofer, start a subcontainer's gofer), which must be children of the
// keeper, not of the daemon.
type spawnRequest struct {
	args []string
	// stdio, ioKey: the streams the command passes into the sandbox, held
	// by the keeper under ioKey for as long as pidFile's process lives.
	stdio   *api.Stdio
	ioKey   string
	pidFile string
	// consoleSocket names the argument the keeper replaces with its
	// console socket (a terminal).
	consoleSocket string
	dir           string
}

// spawn runs a runsc command through the keeper and waits for it. It
// returns the process pidFile names, if any.
func (r *runscCLI) spawn(ctx context.Context, mon *monitor.Monitor, s spawnRequest) (keeper.ProcessRef, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, commandTimeout)
		defer cancel()
	}
	mark := r.logSize()
	req := &api.SpawnRequest{
		Path:          r.path,
		Args:          r.argv(s.args...),
		Env:           runscEnv,
		Dir:           s.dir,
		Stdio:         s.stdio,
		IoKey:         s.ioKey,
		PidFile:       s.pidFile,
		ConsoleSocket: s.consoleSocket,
		Wait:          true,
	}
	if req.Dir == "" {
		req.Dir = "/"
	}
	if req.Stdio == nil {
		req.Stdio = &api.Stdio{}
	}
	res, err := mon.Spawn(ctx, req)
	if err != nil {
		return keeper.ProcessRef{}, fmt.Errorf("running runsc %s: %w", s.args[0], err)
	}
	if res.Exit.Status != 0 {
		return keeper.ProcessRef{}, runscFailure(s.args[0], r.logError(mark), fmt.Errorf("exit status %d", res.Exit.Status))
	}
	return res.Child, nil
}

// logSize is where the log ends now: errors of the next command come after.
func (r *runscCLI) logSize() int64 {
	st, err := os.Stat(r.log)
	if err != nil {
		return 0
	}
	return st.Size()
}

// logError is the last error runsc logged after offset from.
func (r *runscCLI) logError(from int64) string {
	f, err := os.Open(r.log)
	if err != nil {
		return ""
	}
	defer f.Close()
	if _, err := f.Seek(from, io.SeekStart); err != nil {
		return ""
	}
	return lastLoggedError(f)
}

// lastLoggedError reads runsc's JSON log lines and returns the message of
// the last error (runsc logs a failing command's error as
// {"msg": ..., "level": "error"}).
func lastLoggedError(r io.Reader) string {
	var last, fatal string
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var e struct {
			Msg   string `json:"msg"`
			Level string `json:"level"`
		}
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			continue
		}
		switch {
		case e.Level == "error":
			last = e.Msg
		case strings.HasPrefix(e.Msg, "FATAL ERROR: "):
			fatal = strings.TrimPrefix(e.Msg, "FATAL ERROR: ")
		}
	}
	if last == "" {
		last = fatal
	}
	return strings.TrimSpace(last)
}

// runscFailure turns runsc's message into an error of a kind containerd
// understands.
func runscFailure(cmd, msg string, err error) error {
	if msg == "" {
		return fmt.Errorf("runsc %s: %v: %w", cmd, err, errdefs.ErrUnknown)
	}
	lower := strings.ToLower(msg)
	switch {
	case strings.Contains(lower, "does not exist"), strings.Contains(lower, "no such file or directory") && strings.Contains(lower, "loading container"),
		strings.Contains(lower, "not found"):
		return fmt.Errorf("runsc %s: %s: %w", cmd, msg, errdefs.ErrNotFound)
	case strings.Contains(lower, "already exists"):
		return fmt.Errorf("runsc %s: %s: %w", cmd, msg, errdefs.ErrAlreadyExists)
	case strings.Contains(lower, "invalid"), strings.Contains(lower, "unsupported"), strings.Contains(lower, "not supported"),
		strings.Contains(lower, "validating"):
		return fmt.Errorf("runsc %s refused it: %s: %w", cmd, msg, errdefs.ErrInvalidArgument)
	}
	return fmt.Errorf("runsc %s: %s: %w", cmd, msg, errdefs.ErrFailedPrecondition)
}

// stateFile is one container in runsc's root: runsc names its state file
// <container>_sandbox:<sandbox>.state.
type stateFile struct {
	Container, Sandbox string
}

// listState lists the containers of runsc's root directory.
func listState(root string) ([]stateFile, error) {
	entries, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []stateFile
	for _, e := range entries {
		name, ok := strings.CutSuffix(e.Name(), ".state")
		if !ok || e.IsDir() {
			continue
		}
		cid, sid, ok := strings.Cut(name, "_sandbox:")
		if !ok || cid == "" || sid == "" {
			continue
		}
		out = append(out, stateFile{Container: cid, Sandbox: sid})
	}
	return out, nil
}
