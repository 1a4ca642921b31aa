//go:build kube

package integration

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// kubeNodeName is the kubelet's node name. The API server reaches the
// kubelet (logs, exec, port-forward) at the node's Hostname address
// (--kubelet-preferred-address-types=Hostname): it must resolve to the
// loopback address, where the kubelet listens, and localhost does on every
// machine (a kubelet refuses a loopback --node-ip).
const kubeNodeName = "localhost"

// kubeSysctls are the global settings the kubelet changes at start-up
// (protectKernelDefaults=false); the cluster puts them back at the end.
var kubeSysctls = []string{"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops", "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes"}

// kubeCluster is a one-node Kubernetes control plane and kubelet on
// loopback, against a containerd-kuasar under test: etcd, kube-apiserver
// and a kubelet built by `make kube-tools`, everything under the daemon's
// scratch root (so that the harness's leak checks cover them too).
type kubeCluster struct {
	t          *testing.T
	d          *Daemon
	dir        string
	pki        *pki
	kubeconfig string // the admin's
	apiPort    int
	procs      map[string]*kubeProc
	sysctls    map[string]string
	madeDirs   []string // global directories the kubelet made, removed at the end
}

type kubeProc struct {
	cmd    *exec.Cmd
	exited chan error
	log    string
}

// kubeBin is one of the kube tools, or a clear failure naming the target
// that builds it.
func kubeBin(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(binDir, name)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s missing (built by `make kube-tools`, which `make e2e-kube` runs): %v", name, err)
	}
	return p
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// kubeLock is the machine-wide lock of a test's kubelet.
const kubeLock = "/run/kuasar-e2e-kube.lock"

// lockKubeNode waits until no other test's kubelet runs on the machine: a
// kubelet changes settings of the whole machine (sysctls, which each test
// puts back as it found them) and serves a socket at a fixed path
// (/var/lib/kubelet/device-plugins), so two at once would undo each
// other's. The lock goes with the test's process, and at its end.
func lockKubeNode(t *testing.T) {
	t.Helper()
	f, err := os.OpenFile(kubeLock, os.O_CREATE|os.O_RDWR, 0o644)
	must(t, err, "opening %s", kubeLock)
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			t.Fatalf("locking %s: %v", kubeLock, err)
		}
		t.Logf("waiting for another test's kubelet on this machine to end (%s)", kubeLock)
		begin := time.Now()
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
			f.Close()
			t.Fatalf("locking %s: %v", kubeLock, err)
		}
		t.Logf("waited %v for %s", time.Since(begin).Round(time.Second), kubeLock)
	}
	t.Cleanup(func() { f.Close() })
}

// startKubeCluster brings up etcd, the API server and a kubelet against d.
// Its cleanup stops them (before d's own cleanup, which checks for leaks)
// and restores what the kubelet changed on the machine.
func startKubeCluster(t *testing.T, d *Daemon) *kubeCluster {
	t.Helper()
	c := &kubeCluster{t: t, d: d, dir: filepath.Join(d.Dir, "kube"), procs: map[string]*kubeProc{}}
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		t.Fatal(err)
	}
	c.saveSysctls()
	c.noteGlobalDirs()
	t.Cleanup(c.stop)

	p, err := newPKI(filepath.Join(c.dir, "pki"))
	must(t, err, "certificate authority")
	c.pki = p
	for _, cert := range []struct {
		name, cn string
		orgs     []string
		dns      []string
		usage    []x509.ExtKeyUsage
	}{
		{"etcd", "etcd", nil, []string{"localhost"}, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}},
		{"apiserver", "kube-apiserver", nil, []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}},
		{"apiserver-etcd-client", "kube-apiserver-etcd-client", nil, nil, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}},
		// The API server's identity towards kubelets (logs, exec,
		// port-forward): an admin, as kubeadm makes it.
		{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, nil, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}},
		{"admin", "kuasar-e2e-admin", []string{"system:masters"}, nil, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}},
		// The kubelet: a node identity for the Node authorizer and
		// NodeRestriction, and a serving certificate for its own API.
		{"kubelet-client", "system:node:" + kubeNodeName, []string{"system:nodes"}, nil, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}},
		{"kubelet", kubeNodeName, nil, []string{kubeNodeName}, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}},
	} {
		must(t, p.issue(cert.name, cert.cn, cert.orgs, cert.dns, cert.usage), "certificate %s", cert.name)
	}
	must(t, p.serviceAccountKey(), "service account key")

	etcdPort, peerPort := freePort(t), freePort(t)
	etcdURL := fmt.Sprintf("https://127.0.0.1:%d", etcdPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	c.start("etcd", kubeBin(t, "etcd"),
		"--name=e2e", "--data-dir="+filepath.Join(c.dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=e2e="+peerURL, "--initial-cluster-state=new",
		"--cert-file="+p.path("etcd.crt"), "--key-file="+p.path("etcd.key"),
		"--trusted-ca-file="+p.path("ca.crt"), "--client-cert-auth",
		"--listen-metrics-urls=", "--log-level=warn",
		// A test cluster: its data is thrown away at the end.
		"--unsafe-no-fsync")

	c.apiPort = freePort(t)
	c.start("kube-apiserver", kubeBin(t, "kube-apiserver"),
		"--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", c.apiPort),
		"--advertise-address=127.0.0.1",
		// The kubernetes Service's endpoints may not be a loopback address.
		"--endpoint-reconciler-type=none",
		"--etcd-servers="+etcdURL, "--etcd-cafile="+p.path("ca.crt"),
		"--etcd-certfile="+p.path("apiserver-etcd-client.crt"), "--etcd-keyfile="+p.path("apiserver-etcd-client.key"),
		"--tls-cert-file="+p.path("apiserver.crt"), "--tls-private-key-file="+p.path("apiserver.key"),
		"--client-ca-file="+p.path("ca.crt"),
		"--cert-dir="+filepath.Join(c.dir, "apiserver-certs"),
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		"--service-cluster-ip-range=10.96.0.0/24",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+p.path("sa.pub"),
		"--service-account-signing-key-file="+p.path("sa.key"),
		"--kubelet-client-certificate="+p.path("apiserver-kubelet-client.crt"),
		"--kubelet-client-key="+p.path("apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority="+p.path("ca.crt"),
		"--kubelet-preferred-address-types=Hostname",
		"--profiling=false")
	c.kubeconfig = c.writeKubeconfig("admin")
	c.waitAPIServer()

	c.startKubelet()
	c.waitNodeReady()
	return c
}

// start runs one component in the background, its output in a log file.
func (c *kubeCluster) start(name, bin string, args ...string) {
	t := c.t
	t.Helper()
	logPath := filepath.Join(c.dir, name+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Env = c.d.env()
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so that a ^C does not race the orderly stop
	// below; killed if the test's process dies without it (a panic, a
	// timeout, a second ^C).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	p := &kubeProc{cmd: cmd, exited: make(chan error, 1), log: logPath}
	go func() { p.exited <- cmd.Wait() }()
	c.procs[name] = p
	if c.d.ownProcs == nil {
		c.d.ownProcs = map[int]bool{}
	}
	c.d.ownProcs[cmd.Process.Pid] = true
	t.Logf("%s started (pid %d), log %s", name, cmd.Process.Pid, logPath)
}

// stopProc ends one component by its pid: SIGTERM, then SIGKILL.
func (c *kubeCluster) stopProc(name string) {
	p := c.procs[name]
	if p == nil {
		return
	}
	delete(c.procs, name)
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		c.t.Errorf("%s did not stop on SIGTERM", name)
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
	delete(c.d.ownProcs, p.cmd.Process.Pid)
}

// alive fails the test if a component exited.
func (c *kubeCluster) alive() {
	c.t.Helper()
	for name, p := range c.procs {
		select {
		case err := <-p.exited:
			p.exited <- err
			c.t.Fatalf("%s exited: %v\n%s", name, err, tail(p.log, 40))
		default:
		}
	}
}

func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// stop ends the kubelet, the API server and etcd, restores the sysctls the
// kubelet changed and removes the global directories it made.
func (c *kubeCluster) stop() {
	if c.t.Failed() {
		for _, name := range []string{"kubelet", "kube-apiserver", "etcd"} {
			if p := c.procs[name]; p != nil {
				c.t.Logf("%s log (tail):\n%s", name, tail(p.log, 60))
			}
		}
	}
	for _, name := range []string{"kubelet", "kube-apiserver", "etcd"} {
		c.stopProc(name)
	}
	c.unmountKubeletRoot()
	c.restoreSysctls()
	c.removeContainerLogLinks()
	for i := len(c.madeDirs) - 1; i >= 0; i-- {
		dir := c.madeDirs[i]
		if dir == kubeContainerLogs {
			// Only if empty: another kubelet may link there now.
			if err := os.Remove(dir); err != nil {
				c.t.Logf("leaving %s: %v", dir, err)
			}
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			c.t.Errorf("removing %s: %v", dir, err)
		}
	}
	// The kubelet's QoS cgroups (kubepods, burstable, besteffort) are
	// empty now; the daemon's cleanup removes them with the rest of its
	// cgroup tree after its leak check.
}

func (c *kubeCluster) saveSysctls() {
	c.sysctls = map[string]string{}
	for _, k := range kubeSysctls {
		if b, err := os.ReadFile("/proc/sys/" + k); err == nil {
			c.sysctls[k] = strings.TrimSpace(string(b))
		}
	}
}

func (c *kubeCluster) restoreSysctls() {
	for k, v := range c.sysctls {
		b, _ := os.ReadFile("/proc/sys/" + k)
		if strings.TrimSpace(string(b)) == v {
			continue
		}
		if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
			c.t.Errorf("restoring %s to %s: %v", k, v, err)
		} else {
			c.t.Logf("restored %s to %s (the kubelet had set %s)", strings.ReplaceAll(k, "/", "."), v, strings.TrimSpace(string(b)))
		}
	}
}

// kubeContainerLogs is where a kubelet links its containers' logs, whatever
// its flags.
const kubeContainerLogs = "/var/log/containers"

// noteGlobalDirs records which of the directories the kubelet makes
// whatever its flags are missing now: those are removed at the end.
func (c *kubeCluster) noteGlobalDirs() {
	for _, dir := range []string{"/var/lib/kubelet", "/var/lib/kubelet/device-plugins"} {
		if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
			c.madeDirs = append(c.madeDirs, dir)
			break // its children go with it
		}
	}
	if _, err := os.Stat(kubeContainerLogs); errors.Is(err, os.ErrNotExist) {
		c.madeDirs = append(c.madeDirs, kubeContainerLogs)
	}
}

// removeContainerLogLinks removes the links the kubelet left in
// /var/log/containers to logs of this cluster's pods (it removes them
// itself when it collects a container: only a test cut short leaves some).
func (c *kubeCluster) removeContainerLogLinks() {
	entries, _ := os.ReadDir(kubeContainerLogs)
	for _, e := range entries {
		p := filepath.Join(kubeContainerLogs, e.Name())
		if target, err := os.Readlink(p); err == nil && strings.HasPrefix(target, c.dir+"/") {
			_ = os.Remove(p)
		}
	}
}

// writeKubeconfig writes a kubeconfig for the named client certificate.
func (c *kubeCluster) writeKubeconfig(user string) string {
	c.t.Helper()
	cfg := map[string]any{
		"apiVersion": "v1",
		"kind":       "Config",
		"clusters": []any{map[string]any{"name": "e2e", "cluster": map[string]any{
			"server":                fmt.Sprintf("https://127.0.0.1:%d", c.apiPort),
			"certificate-authority": c.pki.path("ca.crt"),
		}}},
		"users": []any{map[string]any{"name": user, "user": map[string]any{
			"client-certificate": c.pki.path(user + ".crt"),
			"client-key":         c.pki.path(user + ".key"),
		}}},
		"contexts":        []any{map[string]any{"name": "e2e", "context": map[string]any{"cluster": "e2e", "user": user}}},
		"current-context": "e2e",
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	must(c.t, err, "kubeconfig")
	path := filepath.Join(c.dir, user+".kubeconfig")
	must(c.t, os.WriteFile(path, b, 0o600), "writing %s", path)
	return path
}

// waitAPIServer waits until the API server reports itself ready.
func (c *kubeCluster) waitAPIServer() {
	t := c.t
	t.Helper()
	cert, err := tls.LoadX509KeyPair(c.pki.path("admin.crt"), c.pki.path("admin.key"))
	must(t, err, "admin certificate")
	pool := x509.NewCertPool()
	pool.AddCert(c.pki.caCert)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool},
	}}
	url := fmt.Sprintf("https://127.0.0.1:%d/readyz", c.apiPort)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		c.alive()
		resp, err := client.Get(url)
		if err == nil {
			body := new(bytes.Buffer)
			_, _ = body.ReadFrom(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			err = fmt.Errorf("%s: %s", resp.Status, body)
		}
		if time.Now().After(deadline) {
			t.Fatalf("API server not ready: %v\n%s", err, tail(c.procs["kube-apiserver"].log, 40))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// startKubelet writes the kubelet's configuration and starts it against
// the daemon, with its root, pod logs and volume plugins in the scratch
// root and its cgroups under the daemon's cgroup parent.
func (c *kubeCluster) startKubelet() {
	t := c.t
	t.Helper()
	root := c.kubeletRoot()
	must(t, os.MkdirAll(root, 0o750), "kubelet root")
	if c.d.ownMounts == nil {
		c.d.ownMounts = map[string]bool{}
	}
	c.d.ownMounts[root] = true
	must(t, makeCgroupRoot(c.d.CgroupParent), "cgroup root %s", c.d.CgroupParent)
	port := freePort(t)
	endpoint := "unix://" + c.d.Addr
	cfg := map[string]any{
		"apiVersion":               "kubelet.config.k8s.io/v1beta1",
		"kind":                     "KubeletConfiguration",
		"address":                  "127.0.0.1",
		"port":                     port,
		"readOnlyPort":             0,
		"healthzPort":              0,
		"containerRuntimeEndpoint": endpoint,
		"imageServiceEndpoint":     endpoint,
		"cgroupDriver":             "cgroupfs",
		"cgroupRoot":               c.d.CgroupParent,
		"cgroupsPerQOS":            true,
		"enforceNodeAllocatable":   []string{"pods"},
		// This host: swap may be on, and cgroup v1 (which the kubelet
		// refuses by default since 1.31).
		"failSwapOn":   false,
		"failCgroupV1": false,
		// Nothing of the host's iptables is touched.
		"makeIPTablesUtilChains": false,
		"podCIDR":                c.d.Subnet,
		"podLogsDir":             filepath.Join(c.dir, "pod-logs"),
		"volumePluginDir":        filepath.Join(c.dir, "volume-plugins"),
		"resolvConf":             "/etc/resolv.conf",
		"tlsCertFile":            c.pki.path("kubelet.crt"),
		"tlsPrivateKeyFile":      c.pki.path("kubelet.key"),
		"authentication": map[string]any{
			"anonymous": map[string]any{"enabled": false},
			"webhook":   map[string]any{"enabled": false},
			"x509":      map[string]any{"clientCAFile": c.pki.path("ca.crt")},
		},
		"authorization": map[string]any{"mode": "Webhook"},
		// A shared test machine: no eviction or image collection because
		// of what other tests do with the disk or memory.
		"evictionHard":                 map[string]string{"memory.available": "1Mi", "nodefs.available": "0%", "imagefs.available": "0%"},
		"mergeDefaultEvictionSettings": false,
		"imageGCHighThresholdPercent":  100,
		"imageGCLowThresholdPercent":   99,
		"serializeImagePulls":          false,
		"syncFrequency":                "10s",
		"nodeStatusUpdateFrequency":    "2s",
		"fileCheckFrequency":           "2s",
		"oomScoreAdj":                  0,
		"shutdownGracePeriod":          "0s",
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	must(t, err, "kubelet config")
	cfgPath := filepath.Join(c.dir, "kubelet.json")
	must(t, os.WriteFile(cfgPath, b, 0o644), "kubelet config")
	kubeconfig := c.writeKubeconfig("kubelet-client")
	c.start("kubelet", kubeBin(t, "kubelet"),
		"--config="+cfgPath, "--kubeconfig="+kubeconfig, "--root-dir="+root,
		"--hostname-override="+kubeNodeName, "--v=2")
}

// unmountKubeletRoot undoes the bind mount the kubelet makes of its root
// directory (to make it a shared mount). Pod volumes still mounted beneath
// it once the kubelet is gone are leaks of the kubelet's (it unmounts them
// when a pod goes): reported, then unmounted.
func (c *kubeCluster) unmountKubeletRoot() {
	root := c.kubeletRoot()
	ms := mountsUnder(root)
	for i := len(ms) - 1; i >= 0; i-- {
		if !c.t.Failed() {
			c.t.Errorf("leak: mount %s left by the kubelet", ms[i])
		}
		if err := syscall.Unmount(ms[i], syscall.MNT_DETACH); err != nil {
			c.t.Errorf("unmounting %s: %v", ms[i], err)
		}
	}
	for _, m := range mountsUnder(filepath.Dir(root)) {
		if m != root {
			continue
		}
		if err := syscall.Unmount(root, syscall.MNT_DETACH); err != nil {
			c.t.Errorf("unmounting %s: %v", root, err)
		}
	}
	delete(c.d.ownMounts, root)
}

func (c *kubeCluster) kubeletRoot() string { return filepath.Join(c.dir, "kubelet") }

// makeCgroupRoot creates a cgroup in every hierarchy, as the kubelet
// requires of its cgroupRoot (on cgroup v1, name=systemd included), with
// the cpuset of its parent.
func makeCgroupRoot(path string) error {
	for _, root := range cgroupRoots() {
		dir := root
		for _, part := range strings.Split(strings.Trim(path, "/"), "/") {
			parent := dir
			dir = filepath.Join(dir, part)
			if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
				return err
			}
			if filepath.Base(root) != "cpuset" {
				continue
			}
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				cur, _ := os.ReadFile(filepath.Join(dir, f))
				if len(bytes.TrimSpace(cur)) > 0 {
					continue
				}
				v, err := os.ReadFile(filepath.Join(parent, f))
				if err != nil {
					return err
				}
				if err := os.WriteFile(filepath.Join(dir, f), v, 0o644); err != nil {
					return fmt.Errorf("%s: %w", filepath.Join(dir, f), err)
				}
			}
		}
	}
	return nil
}

// kubectl is a kubectl command as the cluster's admin.
func (c *kubeCluster) kubectl(args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(binDir, "kubectl"), append([]string{"--kubeconfig", c.kubeconfig}, args...)...)
	cmd.Env = c.d.env()
	return cmd
}

// kubectlIn runs kubectl with stdin, within two minutes, and fails the
// test if it fails; it returns its standard output.
func (c *kubeCluster) kubectlIn(t *testing.T, stdin []byte, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "kubectl"), append([]string{"--kubeconfig", c.kubeconfig}, args...)...)
	cmd.Env = c.d.env()
	var stdout, stderr bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(stdin), &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("kubectl %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// kubectlOut runs kubectl and fails the test if it fails.
func (c *kubeCluster) kubectlOut(t *testing.T, args ...string) string {
	t.Helper()
	return c.kubectlIn(t, nil, args...)
}

// apply applies objects: YAML text, or any JSON-encodable value.
func (c *kubeCluster) apply(t *testing.T, obj any) {
	t.Helper()
	in, ok := obj.(string)
	if !ok {
		b, err := json.Marshal(obj)
		must(t, err, "encoding")
		in = string(b)
	}
	c.kubectlIn(t, []byte(in), "apply", "-f", "-")
}

// kubeNode is the part of a Node the test reads.
type kubeNode struct {
	Status struct {
		Conditions []struct {
			Type, Status, Reason, Message string
		}
		NodeInfo struct {
			ContainerRuntimeVersion, KubeletVersion string
		}
	}
}

func (c *kubeCluster) node() (*kubeNode, error) {
	out, err := c.kubectl("get", "node", kubeNodeName, "-o", "json").Output()
	if err != nil {
		return nil, err
	}
	var n kubeNode
	if err := json.Unmarshal(out, &n); err != nil {
		return nil, err
	}
	return &n, nil
}

// waitNodeReady waits until the node is registered and Ready (its runtime
// and the runtime's network are).
func (c *kubeCluster) waitNodeReady() {
	t := c.t
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	last := "not registered"
	for {
		c.alive()
		if n, err := c.node(); err == nil {
			for _, cond := range n.Status.Conditions {
				if cond.Type == "Ready" {
					if cond.Status == "True" {
						t.Logf("node %s ready: kubelet %s, runtime %s", kubeNodeName, n.Status.NodeInfo.KubeletVersion, n.Status.NodeInfo.ContainerRuntimeVersion)
						return
					}
					last = cond.Reason + ": " + cond.Message
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("node not ready: %s\n%s", last, tail(c.procs["kubelet"].log, 60))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// pki is a self-made certificate authority and what it issued, as files.
type pki struct {
	dir    string
	caCert *x509.Certificate
	caKey  crypto.Signer
}

func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

func newPKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kuasar-e2e-ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	p := &pki{dir: dir, caCert: cert, caKey: key}
	return p, p.write("ca", der, key)
}

// issue makes a certificate for cn (organisations orgs, names dns and
// 127.0.0.1) signed by the authority.
func (p *pki) issue(name, cn string, orgs, dns []string, usage []x509.ExtKeyUsage) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn, Organization: orgs},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  usage,
		DNSNames:     dns,
	}
	if len(dns) > 0 {
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, key.Public(), p.caKey)
	if err != nil {
		return err
	}
	return p.write(name, der, key)
}

func (p *pki) write(name string, der []byte, key *ecdsa.PrivateKey) error {
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(p.path(name+".crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return err
	}
	return os.WriteFile(p.path(name+".key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
}

// serviceAccountKey makes the key pair that signs service account tokens.
func (p *pki) serviceAccountKey() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		return err
	}
	if err := os.WriteFile(p.path("sa.key"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(p.path("sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644)
}
