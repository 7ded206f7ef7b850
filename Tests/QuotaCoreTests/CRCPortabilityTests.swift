import Foundation
import Testing

/// The CRC-32C C target must build for every architecture it has a branch for, not only for the machine the
/// tests run on (a review found GCC-only builtins in the ARMv8 branch, which the toolchain's clang rejects).
/// The real file is compiled for aarch64 by the `clang` next to `swift`, against two stub libc headers, so
/// only the file's own code is judged.
struct CRCPortabilityTests {
    @Test func theCRCTargetCompilesForAarch64WithTheToolchainsClang() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let source = root.appendingPathComponent("Sources/CCRC32C/quota_crc32c.c").path
        let include = root.appendingPathComponent("Sources/CCRC32C/include").path
        let stub = NSTemporaryDirectory() + "quotad-crc-stub-\(getpid())"
        try FileManager.default.createDirectory(atPath: stub + "/sys", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: stub) }
        try "unsigned long getauxval(unsigned long);\n#define AT_HWCAP 16\n".write(toFile: stub + "/sys/auxv.h", atomically: true, encoding: .utf8)
        try "typedef __SIZE_TYPE__ size_t;\nvoid *memcpy(void *, const void *, size_t);\n".write(toFile: stub + "/string.h", atomically: true, encoding: .utf8)
        let clang = try #require(Self.toolchainClang(), "no clang beside swift on PATH")
        let resourceDir = try Self.run(clang, ["-print-resource-dir"]).output.trimmingCharacters(in: .whitespacesAndNewlines)
        let r = try Self.run(clang, ["--target=aarch64-unknown-linux-gnu", "-O2", "-ffreestanding", "-nostdinc",
                                     "-isystem", resourceDir + "/include", "-I", stub, "-I", include, "-Werror",
                                     "-c", source, "-o", stub + "/crc.o"])
        #expect(r.status == 0, "\(r.output)")
    }

    /// The `clang` in the directory of the `swift` found on PATH (the toolchain that builds the package).
    static func toolchainClang() -> String? {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":") {
            let swift = URL(fileURLWithPath: String(dir)).appendingPathComponent("swift").path
            guard FileManager.default.isExecutableFile(atPath: swift) else { continue }
            let real = URL(fileURLWithPath: swift).resolvingSymlinksInPath().deletingLastPathComponent()
            let clang = real.appendingPathComponent("clang").path
            if FileManager.default.isExecutableFile(atPath: clang) { return clang }
        }
        return nil
    }

    static func run(_ tool: String, _ args: [String]) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: tool)
        p.arguments = args
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }
}
