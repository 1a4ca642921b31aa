//go:build e2e

package integration

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// ptyRun runs cmd under a pseudo-terminal, writes input, and returns what
// the terminal showed once the command exits.
func ptyRun(t *testing.T, cmd *exec.Cmd, input string, timeout time.Duration) string {
	t.Helper()
	f, err := pty.Start(cmd)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var mu sync.Mutex
	var out bytes.Buffer
	done := make(chan struct{})
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := f.Read(buf)
			// Answer cursor position queries as a terminal would (busybox's
			// line editor waits for the answer).
			if bytes.Contains(buf[:n], []byte("\x1b[6n")) {
				_, _ = f.Write([]byte("\x1b[1;1R"))
			}
			mu.Lock()
			out.Write(buf[:n])
			mu.Unlock()
			if err != nil {
				close(done)
				return
			}
		}
	}()
	time.Sleep(500 * time.Millisecond)
	if _, err := io.WriteString(f, input); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	select {
	case <-waited:
	case <-time.After(timeout):
		cmd.Process.Kill()
		<-waited
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("%v did not finish; terminal showed:\n%s", cmd.Args, out.String())
	}
	select {
	case <-done:
	case <-time.After(time.Second):
	}
	mu.Lock()
	defer mu.Unlock()
	return strings.ReplaceAll(out.String(), "\r", "")
}

// TestExecStreaming: crictl exec with and without a terminal, through the
// CRI streaming server.
func TestExecStreaming(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("stream")
	pod := d.runPod(t, kuasarRunc, podCfg)
	c := d.run(t, pod, podCfg, ctrConfig("sleeper", "sleep", "3600"))

	// Interactive shell with a terminal: the shell sees a tty and answers.
	out := ptyRun(t, d.crictl("exec", "-it", c, "sh"), "tty; echo kuasar-$((6*7)); exit 5\n", 30*time.Second)
	if !strings.Contains(out, "/dev/pts/") || !strings.Contains(out, "kuasar-42") {
		t.Fatalf("interactive exec output:\n%s", out)
	}

	// Without a terminal: stdin streamed in, stdout streamed out, exit code.
	cmd := d.crictl("exec", "-i", c, "sh", "-c", "read x; echo got-$x; exit 4")
	cmd.Stdin = strings.NewReader("hello\n")
	b, err := cmd.CombinedOutput()
	if !strings.Contains(string(b), "got-hello") {
		t.Fatalf("exec -i output %q (%v)", b, err)
	}
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() == 0 {
		t.Fatalf("exec -i exit: %v", err)
	}
}

// TestAttach attaches to a container started with stdin and a terminal.
func TestAttach(t *testing.T) {
	for _, handler := range []string{kuasarRunc, stockRunc} {
		t.Run(handler, func(t *testing.T) { testAttach(t, handler) })
	}
}

func testAttach(t *testing.T, handler string) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("attach")
	pod := d.runPod(t, handler, podCfg)
	// A read loop rather than an interactive shell: busybox's line editor
	// asks the terminal for the cursor position at start, before anyone
	// is attached to answer, and then swallows the attached input.
	cfg := ctrConfig("shell", "sh", "-c", `while read -r line; do eval "$line"; done`)
	cfg.Stdin, cfg.Tty = true, true
	c := d.run(t, pod, podCfg, cfg)
	d.waitState(t, c, runtimeapi.ContainerState_CONTAINER_RUNNING, 10*time.Second)
	out := ptyRun(t, d.crictl("attach", "-it", c), "echo attached-$((2+3))\nexit 3\n", 30*time.Second)
	if !strings.Contains(out, "attached-5") {
		t.Fatalf("attach output:\n%s", out)
	}
	st := d.waitState(t, c, runtimeapi.ContainerState_CONTAINER_EXITED, 10*time.Second)
	if st.ExitCode != 3 {
		t.Fatalf("exit code %d, want 3", st.ExitCode)
	}
	// What was typed and printed is in the container's log too.
	d.waitLog(t, c, "attached-5", 5*time.Second)

	// A container reading stdin without a terminal sees EOF when the
	// attach with stdin_once ends.
	once := ctrConfig("once", "sh", "-c", "cat; echo stdin-closed")
	once.Stdin, once.StdinOnce = true, true
	o := d.run(t, pod, podCfg, once)
	cmd := d.crictl("attach", "-i", o)
	cmd.Stdin = strings.NewReader("line-from-attach\n")
	b, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("attach -i: %v %s", err, b)
	}
	st = d.waitState(t, o, runtimeapi.ContainerState_CONTAINER_EXITED, 10*time.Second)
	d.waitLog(t, o, "line-from-attach", 5*time.Second)
	d.waitLog(t, o, "stdin-closed", 5*time.Second)
	if st.ExitCode != 0 {
		t.Fatalf("stdin_once container exit %d", st.ExitCode)
	}
}

// TestPortForward forwards a local port to a web server in the pod.
func TestPortForward(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	podCfg := d.podConfig("web")
	pod := d.runPod(t, kuasarRunc, podCfg)
	d.run(t, pod, podCfg, ctrConfig("httpd", "sh", "-c", "mkdir -p /www && echo kuasar-web > /www/index.html && exec httpd -f -p 8080 -h /www"))
	if got := d.portForwardGet(t, pod, 8080, "/"); strings.TrimSpace(got) != "kuasar-web" {
		t.Fatalf("port-forward: %q", got)
	}
}

// portForwardGet forwards a local port to the pod's port with crictl and
// returns the body of an HTTP GET of path through it.
func (d *Daemon) portForwardGet(t *testing.T, pod string, podPort int, path string) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	// crictl ends at the first connection it cannot forward (a server
	// not listening yet): it is started again while the deadline allows.
	var exited chan struct{}
	forward := func() func() {
		cmd := d.crictl("port-forward", pod, fmt.Sprintf("%d:%d", port, podPort))
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited = make(chan struct{})
		done := exited
		go func() { cmd.Wait(); close(done) }()
		if err := waitPort(addr, 15*time.Second); err != nil {
			t.Fatal(err)
		}
		return func() { cmd.Process.Kill(); <-done }
	}
	stop := forward()
	defer func() { stop() }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case <-exited:
			stop = forward()
		default:
		}
		resp, err := http.Get("http://" + addr + path)
		if err == nil {
			body, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			if rerr == nil && resp.StatusCode == http.StatusOK {
				return string(body)
			}
			err = fmt.Errorf("status %s, %d bytes: %v", resp.Status, len(body), rerr)
		}
		if time.Now().After(deadline) {
			t.Fatalf("port-forward to %s:%d: %v", pod, podPort, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
