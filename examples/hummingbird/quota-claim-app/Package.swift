// swift-tools-version:6.1
// An HTTP front for quotad claims: Hummingbird 2 + the QuotaClient library of the main package.
import PackageDescription

let package = Package(
    name: "quota-claim-app",
    platforms: [.macOS(.v15)],
    dependencies: [
        // The main package, for its QuotaClient library. `name:` keeps the reference stable whatever the
        // checkout's folder is called.
        .package(name: "quotad", path: "../../.."),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.0.0"),
        .package(url: "https://github.com/apple/swift-http-types.git", from: "1.0.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
    ],
    targets: [
        .executableTarget(
            name: "QuotaClaimApp",
            dependencies: [
                .product(name: "QuotaClient", package: "quotad"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6), .enableUpcomingFeature("ExistentialAny")]
        )
    ]
)
